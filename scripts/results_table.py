"""Markdown table of the baselines from scripts/train_baselines.sh: accuracy per attack, epochs and times.

Usage: python scripts/results_table.py mnist|fashion-mnist [RUNS_DIR]
"""
import json
import sys
from pathlib import Path


def seconds(runs, name):
    path = runs / f"{name}.seconds"
    return int(path.read_text()) if path.is_file() else None


def main():
    data = sys.argv[1]
    runs = Path(sys.argv[2] if len(sys.argv) > 2 else "runs")
    columns = None
    print_rows = []
    for method in ("standard", "pgd_at", "trades"):
        out = runs / f"{data}-{method}"
        if not (out / "eval.json").is_file():
            continue
        report = json.loads((out / "eval.json").read_text())
        columns = columns or list(report["results"])
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_s = seconds(runs, f"{data}-{method}-train") or round(sum(h["epoch_s"] for h in history))
        eval_s = seconds(runs, f"{data}-{method}-eval")
        accs = " | ".join(f"{100 * report['results'][c]['accuracy']:.1f}" for c in columns)
        print_rows.append(f"| {method} | {accs} | {len(history)} | {train_s / 60:.1f} | {eval_s / 60:.1f} |")
    if not print_rows:
        sys.exit(f"no evaluated runs for {data} under {runs}")
    print(f"| method | {' | '.join(columns)} | epochs | train (min) | eval (min) |")
    print("|---" * (len(columns) + 4) + "|")
    print("\n".join(print_rows))


if __name__ == "__main__":
    main()
