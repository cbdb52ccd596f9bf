"""The adaptive-attack study (docs/results.md): does SNS's lead over PGD-AT on MNIST (and
Fashion-MNIST) survive an attack that knows SNS?

Trains (when RUNS/mnist-METHOD-s0/model.pt is missing) a standard, a PGD-AT and an SNS small CNN
at the reduced ablation budget (20,000 training images, 3 epochs, PGD-5 at eps 0.3, seed 0), then
evaluates each on the first N test images (eps 0.3): clean, PGD-40 and CW-40 (step 0.01), the
neuron-targeted PGD-40 (six settings: SNS's layers or its hidden layers only; cross-entropy with
weight 1 or 3, or the CW margin with weight 1), the feature-only PGD-40, AutoAttack, Square
(1,000 queries), the per-sample worst cases (over PGD-40, AutoAttack and the neuron-targeted
settings; over the gradient-based attacks; over all), and the gradient-masking checks. Every
attack starts from seed 0. Each attack's per-sample results are cached in
RUNS/mnist-METHOD-s0/adaptive-hits.pt; the study writes RUNS/mnist-METHOD-s0/adaptive.json and
prints the markdown tables of all finished methods.

Usage, from the repository root:
    python scripts/adaptive_attack.py RUNS [--data mnist] [--methods standard pgd_at sns] [-n 500] [--table-only]

With --data fashion-mnist the same study runs at eps 0.1 (training step eps / 3, as on MNIST) and
its folders are RUNS/fashion-mnist-METHOD-s0.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from neurosens import data as datasets
from neurosens.attacks import make_attack
from neurosens.checkpoint import load_checkpoint, model_from_state
from neurosens.evaluation import evaluate, masking_checks, survived_all

STEPS, ALPHA = 40, 0.01
#: The eps of each data set, as in docs/results.md; set by main().
EPS_OF = {"mnist": 0.3, "fashion-mnist": 0.1}
DATA, EPS = "mnist", EPS_OF["mnist"]


def train_args():
    return ["--arch", "small-cnn", "--data", DATA, "--seed", "0", "--train-limit", "20000", "--eps", str(EPS),
            "--alpha", f"{EPS / 3:.4g}", "--steps", "5", "--epochs", "3", "--batch-size", "128", "--optimizer", "adam",
            "--lr", "1e-3", "--weight-decay", "0", "--eval-limit", "0", "--threads", "1", "--no-progress", "--resume"]
#: The neuron-targeted settings: label -> make_attack options.
NEURON = {**{f"neuron-pgd {layers} w{weight:g}": {"layers": layers, "weight": weight}
             for layers in ("auto", "hidden") for weight in (1.0, 3.0)},
          **{f"neuron-cw {layers} w1": {"layers": layers, "weight": 1.0, "loss": "cw"} for layers in ("auto", "hidden")}}
#: The attacks of the worst case the study reports (the brief's: PGD-40, AutoAttack, the neuron-targeted one).
WORST = ["pgd-40", "autoattack", *NEURON]


def train(runs, method):
    out = runs / f"{DATA}-{method}-s0"
    if (out / "model.pt").exists():
        return out
    warmup = [] if method == "standard" else ["--eps-warmup", "1"]
    started = time.time()
    with open(runs / f"{DATA}-{method}-s0.train.log", "w") as log:
        subprocess.run([sys.executable, "-m", "neurosens", "train", "--method", method, *train_args(), *warmup, "--out", str(out)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    (runs / f"{DATA}-{method}-s0.train.seconds").write_text(f"{time.time() - started:.0f}\n")
    return out


def attacks_for(model):
    attacks = {f"pgd-{STEPS}": make_attack("pgd", model, EPS, alpha=ALPHA, steps=STEPS),
               f"cw-{STEPS}": make_attack("cw", model, EPS, alpha=ALPHA, steps=STEPS)}
    for label, options in NEURON.items():
        attacks[label] = make_attack("neuron-pgd", model, EPS, alpha=ALPHA, steps=STEPS, **options)
    attacks["feature-pgd auto"] = make_attack("feature-pgd", model, EPS, alpha=ALPHA, steps=STEPS)
    attacks["autoattack"] = make_attack("autoattack", model, EPS, seed=0)
    attacks["square"] = make_attack("square", model, EPS, seed=0, queries=1000)
    return attacks


def study(out, samples):
    path = out / "model.pt"
    model = model_from_state(load_checkpoint(path), path, "cpu")
    loader = datasets.make_loader(datasets.load(DATA, train=False, root="data").first(samples), 500)
    # Each attack's per-sample results are kept as they come, so an interrupted study goes on
    # where it stopped and a new attack adds only its own run.
    cache = out / "adaptive-hits.pt"
    saved = torch.load(cache) if cache.exists() else {}
    hits, rows = {}, {}
    result = evaluate(model, loader, {}, per_sample=True)
    hits["clean"], rows["clean"] = result["hits"]["clean"], {"accuracy": result["clean"], "seconds": 0.0}
    for label, attack in attacks_for(model).items():
        if label not in saved:
            torch.manual_seed(0)
            started = time.perf_counter()
            result = evaluate(model, loader, {label: attack}, per_sample=True)
            saved[label] = {"hits": result["hits"][label], "seconds": time.perf_counter() - started}
            torch.save(saved, cache)
        hits[label] = saved[label]["hits"]
        rows[label] = {"accuracy": hits[label].float().mean().item(), "seconds": saved[label]["seconds"]}
        print(f"{out.name} {label}: {100 * rows[label]['accuracy']:.1f}% ({rows[label]['seconds']:.0f} s)", flush=True)
    worst = {"clean": hits["clean"], **{label: hits[label] for label in WORST}}
    rows["worst"] = {"accuracy": survived_all(worst), "over": WORST}
    white_box = [label for label in hits if label.startswith(("pgd", "cw", "neuron"))]
    rows["white-box worst"] = {"accuracy": survived_all({label: hits[label] for label in ["clean", *white_box]}),
                               "over": white_box}
    rows["worst-all"] = {"accuracy": survived_all(hits), "over": [label for label in hits if label != "clean"]}
    started = time.perf_counter()
    checks = masking_checks(model, loader, EPS, queries=1000, seed=0)
    checks["seconds"] = time.perf_counter() - started
    report = {"n": samples, "eps": EPS, "results": rows, "masking": checks}
    (out / "adaptive.json").write_text(json.dumps(report, indent=2))
    return report


def pct(value):
    return f"{100 * value:.1f}"


def tables(runs, methods):
    reports = {m: json.loads((runs / f"{DATA}-{m}-s0" / "adaptive.json").read_text())
               for m in methods if (runs / f"{DATA}-{m}-s0" / "adaptive.json").exists()}
    if not reports:
        return
    labels = [label for label in next(iter(reports.values()))["results"]]
    print("| method | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for method, report in reports.items():
        print(f"| {method} | " + " | ".join(pct(report["results"][label]["accuracy"]) for label in labels) + " |")
    print()
    first = next(iter(reports.values()))["masking"]
    print(f"| method | white-box PGD-{first['eps_curve']['steps']} | Square | PGD at eps "
          + " / ".join(f"{e:g}" for e in first["eps_curve"]["eps"])
          + " | PGD at " + " / ".join(map(str, first["steps"]["steps"])) + " steps | verdict |")
    print("|---|---:|---:|---|---|---|")
    for method, report in reports.items():
        m = report["masking"]
        verdict = {name: "pass" if m[name]["passed"] else "FAIL" for name in ("black_box", "eps_curve", "steps")}
        print(f"| {method} | {pct(m['black_box']['white_box'])} | {pct(m['black_box']['square'])} ({verdict['black_box']}) | "
              f"{' / '.join(map(pct, m['eps_curve']['accuracy']))} ({verdict['eps_curve']}) | "
              f"{' / '.join(map(pct, m['steps']['accuracy']))} ({verdict['steps']}) | {'pass' if m['passed'] else 'FAIL'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--data", default="mnist", choices=sorted(EPS_OF))
    parser.add_argument("--methods", nargs="+", default=["standard", "pgd_at", "sns"])
    parser.add_argument("-n", "--samples", type=int, default=500)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    global DATA, EPS
    DATA, EPS = args.data, EPS_OF[args.data]
    torch.set_num_threads(1)
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for method in args.methods:
            out = train(args.runs, method)
            if not (out / "adaptive.json").exists():
                study(out, args.samples)
    tables(args.runs, args.methods)


if __name__ == "__main__":
    main()
