"""`neurosens demo`: the whole flow on the embedded digits data (or MNIST) in a few minutes."""
import json
import os
import time

HELP = ("Train standard, adversarially trained and SNS-trained small CNNs, measure their neuron sensitivity, run the "
        "intervention experiments and write an HTML report (embedded digits data by default).")

# Budgets that fit a 2-core CPU in a few minutes; eps is the usual one for each data set.
PRESETS = {
    "digits": {"eps": 0.1, "epochs": 12, "train": None, "test": None},
    "mnist": {"eps": 0.3, "epochs": 4, "train": 12000, "test": 1000},
}


def add_arguments(parser):
    from . import add_eps, add_root, out_dir, positive_int

    parser.add_argument("--data", choices=sorted(PRESETS), default="digits",
                        help="digits (scikit-learn, 28x28, nothing to fetch) or mnist (after `neurosens data fetch mnist`)")
    parser.add_argument("--out", type=out_dir, default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--methods", nargs="+", default=["standard", "pgd_at", "trades", "sns"],
                        help="training methods to compare (default: standard pgd_at trades sns)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: per data set)")
    add_eps(parser, "0.1 digits, 0.3 mnist")
    parser.add_argument("--steps", type=positive_int, default=7, help="PGD steps while training (default: 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    add_root(parser)


def run(args):
    import torch

    from .. import data as datasets
    from ..models import build_model
    from ..extension import info
    from ..study import run_study
    from ..training import Trainer, TrainConfig, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.data]
    eps = args.eps if args.eps is not None else preset["eps"]
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    started = time.perf_counter()
    train_set = datasets.load(args.data, train=True, root=args.root)
    test_set = datasets.load(args.data, train=False, root=args.root)
    if preset["train"]:
        train_set = train_set.subset(preset["train"], seed=args.seed)
        test_set = test_set.subset(preset["test"], seed=args.seed)
    mean, std = datasets.stats(args.data)
    channels, size, _ = train_set.shape
    spec = {"name": "small-cnn", "num_classes": train_set.num_classes, "in_channels": channels, "input_size": size,
            "mean": list(mean) if mean else None, "std": list(std) if std else None}
    print(f"neurosens demo: {args.data}, {len(train_set)} training and {len(test_set)} test images, eps {eps}; "
          f"kernels: {info()['cpu kernels']}")

    models = {}
    for method in args.methods:
        config = TrainConfig(method=method, epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                             schedule="cosine", eps=eps, steps=args.steps, eval_steps=10, eval_limit=300, seed=args.seed)
        seed_everything(args.seed)
        model = build_model(**spec)
        Trainer(model, train_set, test_set, config, out_dir=os.path.join(args.out, method),
                meta={"model": spec, "data": args.data}).fit()
        models[method] = model.eval()

    report_dir = os.path.join(args.out, "report")
    summary = run_study(models, test_set, eps, report_dir, title=f"neurosens demo ({args.data}, eps {eps})")
    print(f"\n{'model':10s} " + " ".join(f"{c:>8s}" for c in summary["robustness"][args.methods[0]] if c != "n"))
    for label, row in summary["robustness"].items():
        print(f"{label:10s} " + " ".join(f"{100 * v:7.1f}%" for c, v in row.items() if c != "n"))
    print("\nmean sensitivity per layer:")
    for label, means in summary["layer_means"].items():
        print(f"{label:10s} " + "  ".join(f"{layer} {value:.4f}" for layer, value in means.items()))
    inter = summary["interventions"]
    print(f"\ninterventions on {inter['model']}, layer {inter['layer']} (about 10% of its neurons):")
    for name, v in inter["at_10_percent"].items():
        print(f"  {name:15s} k={v['k']:<3d} benign {100 * v['benign']:5.1f}%  adversarial {100 * v['adversarial']:5.1f}%")
    print(f"\nreport: {os.path.join(report_dir, 'index.html')}  ({time.perf_counter() - started:.0f} s)")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"data": args.data, "eps": eps, "epochs": epochs, "methods": args.methods,
                   "seconds": time.perf_counter() - started}, f, indent=2)
    return 0
