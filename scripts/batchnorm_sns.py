"""SNS training of a BatchNorm CNN with one forward of [x; x_adv] per step (joint) against two
(separate): clean and PGD accuracy per seed, as a markdown table.

    python scripts/batchnorm_sns.py --seeds 0 1 2 --out runs/batchnorm_sns
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from neurosens import data
from neurosens.attacks import PGD
from neurosens.evaluation import evaluate
from neurosens.training import TrainConfig, Trainer


def bn_cnn():
    """Two conv blocks and a hidden linear layer, each followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=10000, help="training images (a seeded subset)")
    parser.add_argument("--test", type=int, default=1000, help="test images (a seeded subset)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--out", default="runs/batchnorm_sns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set = data.load("fashion-mnist", train=True).subset(args.train, seed=0)
    test_set = data.load("fashion-mnist", train=False).subset(args.test, seed=0)
    rows = []
    for seed in args.seeds:
        for forward in ("separate", "joint"):
            cfg = TrainConfig(method="sns", epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3,
                              weight_decay=0.0, schedule="constant", eps=args.eps, steps=5, eval_limit=0, seed=seed,
                              sns_forward=forward, progress=False)
            torch.manual_seed(seed)
            model = bn_cnn()
            started = time.perf_counter()
            Trainer(model, train_set, None, cfg).fit()
            train_s = time.perf_counter() - started
            torch.manual_seed(seed)
            attack = PGD(model, args.eps, steps=20)
            acc = evaluate(model, data.make_loader(test_set, 250), {"pgd-20": attack})
            rows.append({"seed": seed, "forward": forward, "clean": acc["clean"], "pgd-20": acc["pgd-20"], "train_s": train_s})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
