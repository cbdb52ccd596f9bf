"""The clean/robust frontier of the runs of scripts/frontier.sh (or any `neurosens train` run folders
evaluated with `neurosens eval --json RUN/eval.json`): a markdown table of every (method, knob
value), the comparison of one method against the others at equal clean accuracy, and the figure.

Usage: python scripts/frontier.py [RUNS_DIR] [--attack autoattack] [--method sns] [--plot PNG] [--title TEXT]
"""
import argparse
import sys

from neurosens.frontier import EVAL, collect, compare, comparison_table, find_runs, points_table, summarize


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", default="runs/frontier", help="folder of run folders (default: runs/frontier)")
    parser.add_argument("--attack", default="autoattack",
                        help="the robust accuracy: a result of the evaluation JSON (default: autoattack)")
    parser.add_argument("--method", default="sns",
                        help="the method compared with the others at equal clean accuracy (default: sns)")
    parser.add_argument("--eval-name", default=EVAL, help=f"evaluation JSON in each run folder (default: {EVAL})")
    parser.add_argument("--plot", help="write the figure to this PNG")
    parser.add_argument("--title", help="the figure's title")
    args = parser.parse_args()
    try:
        evaluated, pending = find_runs(args.runs, args.eval_name)
        summaries = summarize(collect(evaluated, args.attack, args.eval_name))
        rows = compare(summaries, args.method)
    except ValueError as err:
        sys.exit(f"frontier: {err}")
    if pending:
        print(f"not yet evaluated, left out: {', '.join(p.name for p in pending)}\n", file=sys.stderr)
    n = summaries[0].n
    print(f"{len(evaluated)} runs, first {n} test images; accuracies in %, ± a 95% interval\n")
    print(points_table(summaries, args.attack))
    print(f"\n{args.method} against the others at equal clean accuracy ({args.attack}):\n")
    print(comparison_table(rows, args.attack) if rows else "(no overlap in clean accuracy)")
    if args.plot:
        from neurosens.plots import plot_frontier

        plot_frontier(summaries, args.plot, title=args.title, attack=args.attack)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
