"""Sensitivity while training on MNIST: standard, PGD-AT and SNS runs of the small CNN with the
monitor on, and one figure of each method's per-layer sensitivity beside its probe accuracy.

Each run is `neurosens train --monitor 200 --monitor-every 25` on a seeded subset of the training
images, two runs at a time on one thread each; finished runs are skipped. The figure goes to
--figure, a markdown table of the records to stdout.

    python scripts/monitor_study.py                       # runs/monitor-mnist-*, docs/mnist_monitor.png
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neurosens.monitor import monitor_records
from neurosens.plots import plot_monitor

METHODS = ("standard", "pgd_at", "sns")


def train(method, args):
    out = Path(args.runs) / f"monitor-mnist-{method}-s{args.seed}"
    if (out / "model.pt").is_file():
        return out
    command = [sys.executable, "-m", "neurosens", "train", "--data", "mnist", "--method", method, "--seed", str(args.seed),
               "--train-limit", str(args.train_limit), "--epochs", str(args.epochs), "--batch-size", "128",
               "--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "0", "--eps", "0.3", "--alpha", "0.1",
               "--steps", "5", "--eval-steps", "10", "--eval-limit", "500",
               "--monitor", str(args.probe), "--monitor-every", str(args.every), "--monitor-steps", "20",
               "--threads", "1", "--no-progress", "--resume", "--out", str(out)]
    if method != "standard":
        command += ["--eps-warmup", "1"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--probe", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--figure", default="docs/mnist_monitor.png")
    args = parser.parse_args()

    with ThreadPoolExecutor(args.jobs) as pool:
        outs = dict(zip(METHODS, pool.map(lambda m: train(m, args), METHODS)))
    runs, seconds = {}, {}
    for method, out in outs.items():
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[method] = monitor_records(history)
        seconds[method] = (sum(h["epoch_s"] for h in history), sum(h["monitor_s"] for h in history))
    plot_monitor(runs, path=args.figure,
                 title=f"MNIST, small CNN, {args.train_limit} training images, probe: {args.probe} test images, PGD-20 eps 0.3")
    layers = list(next(iter(runs.values()))[0]["sensitivity"])
    print("| method | step | epoch | clean | PGD-20 | " + " | ".join(layers) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(layers))
    for method, records in runs.items():
        for r in records:
            if r["step"] == 0 or r["step"] % (4 * args.every) == 0 or r is records[-1]:
                print(f"| {method} | {r['step']} | {r['epoch']} | {100 * r['clean']:.1f} | {100 * r['robust']:.1f} | "
                      + " | ".join(f"{r['sensitivity'][layer]:.3f}" for layer in layers) + " |")
    for method, (total, probe) in seconds.items():
        print(f"{method}: {total:.0f} s for the epochs, of which {probe:.0f} s measuring "
              f"({len(runs[method])} measurements)")
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
