"""Markdown table of trained runs (the SNS ablations of scripts/sns_ablation.sh, or the runs of
scripts/train_models.sh): accuracy under each attack, the mean L1 sensitivity of each layer under
PGD-20 on the same 1,000 test images, and training time.

Usage: python scripts/ablation_table.py [RUNS_DIR] [--eps 0.3] [--match 'mnist-*']
"""
import argparse
import json
from pathlib import Path

import torch

from neurosens import data, measure
from neurosens.attacks import PGD
from neurosens.checkpoint import load_checkpoint, load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", default="runs/ablation")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("-n", "--num", type=int, default=1000)
    parser.add_argument("--match", default="*", help="glob of the run folders to include (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    rows, layers = [], None
    for out in sorted(p for p in runs.glob(args.match) if (p / "eval.json").is_file()):
        results = json.loads((out / "eval.json").read_text())["results"]
        model = load_model(out / "model.pt")
        meta = load_checkpoint(out / "model.pt")["meta"]
        test = torch.utils.data.Subset(data.load(meta["data"], train=False), range(args.num))
        torch.manual_seed(0)
        means = measure(model, data.make_loader(test, 500), PGD(model, args.eps, steps=20), progress=False).layer_means()
        layers = layers or list(means)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows.append((out.name, results, means, round(sum(h["epoch_s"] for h in history))))
    attacks = list(rows[0][1])
    print("| variant | " + " | ".join(attacks) + " | " + " | ".join(f"sens. {l}" for l in layers) + " | train (s) |")
    print("|---" * (1 + len(attacks) + len(layers) + 1) + "|")
    order = {"pgd_at": 0, "sns": 1}
    for name, results, means, seconds in sorted(rows, key=lambda r: (order.get(r[0], 2), r[0])):
        accs = " | ".join(f"{100 * results[a]['accuracy']:.1f}" for a in attacks)
        sens = " | ".join(f"{means[l]:.3f}" for l in layers)
        print(f"| {name} | {accs} | {sens} | {seconds} |")


if __name__ == "__main__":
    main()
