"""Robust accuracy of a trained model under our PGD and torchattacks' PGD, same inputs and settings.

Usage: python scripts/compare_torchattacks.py runs/mnist-pgd_at/model.pt --eps 0.3 --alpha 0.01 --steps 40 -n 1000
"""
import argparse
import json
import time

import torch
import torchattacks

from neurosens import data
from neurosens.attacks import PGD
from neurosens.checkpoint import load_checkpoint, load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--alpha", type=float, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("-n", "--num", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3, help="random starts to average over")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.checkpoint)
    x, y = data.load(load_checkpoint(args.checkpoint)["meta"]["data"], train=False).tensors(args.num)
    attacks = {
        "neurosens": PGD(model, args.eps, args.alpha, args.steps),
        "torchattacks": torchattacks.PGD(model, eps=args.eps, alpha=args.alpha, steps=args.steps, random_start=True),
    }
    results = {}
    for name, attack in attacks.items():
        started, accs = time.perf_counter(), []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            correct = 0
            for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)):
                x_adv = attack(xb, yb)
                with torch.no_grad():
                    correct += (model(x_adv).argmax(1) == yb).sum().item()
            accs.append(correct / len(y))
        results[name] = {"accuracy": accs, "mean": sum(accs) / len(accs), "seconds": time.perf_counter() - started}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
