"""`neurosens sensitivity`: measure a trained model's neuron sensitivity over a data set."""
import os
from fractions import Fraction

HELP = "Measure per-neuron sensitivity of a trained model under attack; write report.json, CSVs and PNG plots."


def number(text):
    """A float, also written as a fraction such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {text!r}") from None


def add_arguments(parser):
    from ..attacks import ATTACKS, NORMS
    from ..capture import AUTO_KINDS
    from ..data import DATASETS
    from ..models import MODELS
    from ..reference import METRICS

    parser.add_argument("--model", required=True, metavar="CKPT", help="model.pt or checkpoint.pt written by training")
    parser.add_argument("--arch", choices=sorted(MODELS), help="architecture; default: the one recorded in the checkpoint")
    parser.add_argument("--data", choices=sorted(DATASETS), help="data set; default: the one recorded in the checkpoint")
    parser.add_argument("--data-root", help="folder holding the data sets (default: $NEUROSENS_DATA or ./data)")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="which split to measure on (default: test)")
    parser.add_argument("--samples", type=int, help="measure on this many samples (a seeded random subset); default: all")
    parser.add_argument("--batch-size", type=int, default=256, help="benign/adversarial pairs per forward (default: 256)")
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="pgd", help="attack crafting x' (default: pgd)")
    parser.add_argument("--eps", type=number, help="attack budget in pixel units, e.g. 0.3 or 8/255; default: the training eps")
    parser.add_argument("--alpha", type=number, help="step size for pgd/cw (default: 2.5 * eps / steps)")
    parser.add_argument("--steps", type=int, default=20, help="steps for pgd/cw (default: 20)")
    parser.add_argument("--norm", choices=NORMS, default="linf", help="attack norm (default: linf)")
    parser.add_argument("--layers", nargs="+", default=["auto"], metavar="LAYER",
                        help="layer names, glob patterns (quote them: 'layer3.*.conv2'), module types such as nn.Conv2d, "
                             "or auto (default)")
    parser.add_argument("--auto", choices=sorted(AUTO_KINDS), default="conv_linear",
                        help="what --layers auto selects: every conv/linear output or every ReLU output (default: conv_linear)")
    parser.add_argument("--metric", choices=METRICS, default="l1", help="distance between benign and adversarial maps (default: l1)")
    parser.add_argument("--relative", action="store_true", help="divide l1/l2 by the benign map's mean absolute value")
    parser.add_argument("--channel-dim", type=int, default=1, help="dim of the neurons: 1 for [N, C, ...], -1 for [N, T, C] (default: 1)")
    parser.add_argument("--top", type=int, default=3, help="most sensitive neurons to print per layer (default: 3)")
    parser.add_argument("--label", help="name of this model in tables and plots (default: the checkpoint's folder name)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="REPORT",
                        help="report.json files of other models for the same plots and a comparison table (ratios are to the first)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the attack's random start")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, CSVs and PNGs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _layer_specs(entries):
    """Layer arguments as select_layers takes them: ``nn.Conv2d`` names a torch.nn module type."""
    from torch import nn

    specs = []
    for entry in entries:
        if entry.startswith("nn."):
            cls = getattr(nn, entry[3:], None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ValueError(f"--layers {entry}: torch.nn has no module type {entry[3:]!r}")
            specs.append(cls)
        else:
            specs.append(entry)
    return specs


def _load_model(args, state, dataset, device):
    """The model of a training checkpoint: rebuilt from its recorded arguments, or from --arch."""
    from ..models import build_model

    spec = dict((state.get("meta") or {}).get("model") or {})
    if spec and args.arch and spec.get("name") != args.arch:
        raise ValueError(f"{args.model}: the checkpoint holds a {spec.get('name')!r} model, but --arch is {args.arch!r}")
    if not spec:
        if not args.arch:
            raise ValueError(f"{args.model}: the checkpoint does not record its architecture; give --arch")
        channels, size = dataset.shape[0], dataset.shape[1]
        spec = {"name": args.arch, "num_classes": dataset.num_classes, "in_channels": channels, "input_size": size}
        if any(key.startswith("normalize.") for key in state["model"]):
            # Placeholders: the checkpoint's own mean and std are loaded below.
            spec.update(mean=[0.0] * channels, std=[1.0] * channels)
    model = build_model(**spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _print_summary(report, top):
    print(f"{report.meta['model']} ({report.meta.get('label')}), {report.meta['samples']} samples, "
          f"attack {report.meta['attack']}, metric {report.meta['metric']}")
    if "clean_accuracy" in report.meta:
        print(f"accuracy: clean {report.meta['clean_accuracy']:.4f}, adversarial {report.meta['adversarial_accuracy']:.4f}")
    width = max(len("layer"), *(len(name) for name in report.layers))
    print(f"{'layer':<{width}}  {'neurons':>7}  {'mean':>10}  {'max':>10}  most sensitive")
    for name, values in report.sensitivity.items():
        listed = ", ".join(map(str, report.topk(name, min(top, values.numel())).indices.tolist()))
        print(f"{name:<{width}}  {values.numel():>7}  {values.mean().item():>10.4g}  {values.max().item():>10.4g}  {listed}")


def run(args):
    import torch

    from .. import data
    from ..attacks import ATTACKS
    from ..report import SensitivityReport, compare, save_plots
    from ..sensitivity import describe, measure
    from ..training import load_checkpoint

    if args.samples is not None and args.samples < 1:
        raise SystemExit("neurosens sensitivity: --samples must be at least 1")
    if args.top < 1:
        raise SystemExit("neurosens sensitivity: --top must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        others = [SensitivityReport.from_json(path) for path in args.compare]
        state = load_checkpoint(args.model)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{args.model}: not a neurosens checkpoint (it has no 'model' entry)")
        data_name = args.data or (state.get("meta") or {}).get("data")
        if data_name is None:
            raise ValueError(f"{args.model}: the checkpoint does not record its data set; give --data")
        eps = args.eps if args.eps is not None else (state.get("config") or {}).get("eps")
        if eps is None:
            raise ValueError(f"{args.model}: the checkpoint does not record a training eps; give --eps")
        dataset = data.load(data_name, train=args.split == "train", root=args.data_root)
        if args.samples is not None:
            dataset = dataset.subset(args.samples, seed=args.seed)
        model = _load_model(args, state, dataset, device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"neurosens sensitivity: {err}") from None

    kinds = {"pgd": dict(alpha=args.alpha, steps=args.steps, norm=args.norm), "cw": dict(alpha=args.alpha, steps=args.steps, norm=args.norm),
             "fgsm": dict(norm=args.norm), "autoattack": dict(norm=args.norm, num_classes=dataset.num_classes, seed=args.seed)}
    attack = ATTACKS[args.attack](model, eps, **kinds[args.attack])
    label = args.label or os.path.basename(os.path.dirname(os.path.abspath(args.model))) or "model"
    torch.manual_seed(args.seed)
    try:
        report = measure(
            model,
            data.make_loader(dataset, args.batch_size),
            attack,
            layers=_layer_specs(args.layers),
            metric=args.metric,
            channel_dim=args.channel_dim,
            relative=args.relative,
            auto=args.auto,
            device=device,
            progress=not args.no_progress,
            meta={"label": label, "attack": describe(attack), "eps": eps, "data": data_name, "split": args.split,
                  "checkpoint": args.model},
        )
    except (ValueError, TypeError, RuntimeError) as err:
        raise SystemExit(f"neurosens sensitivity: {err}") from None

    os.makedirs(args.out, exist_ok=True)
    report.to_json(os.path.join(args.out, "report.json"))
    report.to_csv(os.path.join(args.out, "sensitivity.csv"))
    reports = others + [report]  # the first --compare report is the baseline of the ratios
    labels = []
    for i, r in enumerate(reports):
        name = label if r is report else r.meta.get("label") or f"report {i + 1}"
        labels.append(name if name not in labels else f"{name} ({i + 1})")
    table = compare(reports, labels)
    table.to_csv(os.path.join(args.out, "layer_means.csv"))
    save_plots(reports, args.out, labels)

    _print_summary(report, args.top)
    if others:
        print()
        print(table.to_markdown())
    print(f"\nwrote report.json, sensitivity.csv, layer_means.csv, layer_means.png, histograms.png, sorted.png to {args.out}")
    return 0
