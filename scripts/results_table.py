"""Markdown table of the runs of scripts/train_models.sh (or of scripts/attribution.sh, naming its
variants): accuracy per attack as the mean over seeds with the spread (half the range) when there
are several, epochs and times per run.

Usage: python scripts/results_table.py mnist|fashion-mnist [RUNS_DIR [METHOD ...]]
"""
import json
import sys
from pathlib import Path

METHODS = ("standard", "pgd_at", "trades", "sns")


def cell(values):
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"


def main():
    data = sys.argv[1]
    runs = Path(sys.argv[2] if len(sys.argv) > 2 else "runs")
    columns, rows = None, []
    for method in sys.argv[3:] or METHODS:
        evaluated = sorted(p for p in runs.glob(f"{data}-{method}-s*") if (p / "eval.json").is_file())
        if not evaluated:
            continue
        results, train_s, eval_s, epochs = [], [], [], set()
        for out in evaluated:
            report = json.loads((out / "eval.json").read_text())["results"]
            columns = columns or list(report)
            results.append(report)
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            epochs.add(len(history))
            train_s.append(sum(h["epoch_s"] for h in history))
            eval_s.append(sum(r["seconds"] for r in report.values()))
        accs = " | ".join(cell([r[c]["accuracy"] for r in results]) for c in columns)
        seeds = ",".join(p.name.rsplit("-s", 1)[1] for p in evaluated)
        rows.append(f"| {method} | {seeds} | {accs} | {'/'.join(map(str, sorted(epochs)))} "
                    f"| {sum(train_s) / len(train_s) / 60:.0f} | {sum(eval_s) / len(eval_s) / 60:.1f} |")
    if not rows:
        sys.exit(f"no evaluated runs for {data} under {runs}")
    print(f"| method | seeds | {' | '.join(columns)} | epochs | train (min/run) | eval (min/run) |")
    print("|---" * (len(columns) + 5) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
