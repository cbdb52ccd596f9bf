"""`neurosens sensitivity`: measure a trained model's neuron sensitivity over a data set."""
import os

HELP = "Measure per-neuron sensitivity of a trained model under attack; write report.json, CSVs and PNG plots."


def add_arguments(parser):
    from ..attacks import ATTACKS, NORMS
    from ..layers import AUTO_KINDS
    from ..models import MODELS
    from ..reference import METRICS
    from . import add_data, add_eps, add_layers, add_logits, add_model, add_samples, device, out_dir, positive, positive_int

    add_model(parser)
    parser.add_argument("--arch", choices=sorted(MODELS), help="architecture (default: the one recorded in the checkpoint)")
    add_data(parser)
    parser.add_argument("--split", choices=["test", "train"], default="test", help="which split to measure on (default: test)")
    add_samples(parser, 0)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="benign/adversarial pairs per forward (default: 256)")
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="pgd", help="attack crafting x' (default: pgd)")
    add_eps(parser)
    parser.add_argument("--alpha", type=positive, help="step size for pgd/cw (default: 2.5 * eps / steps)")
    parser.add_argument("--steps", type=positive_int, default=20, help="steps for pgd/cw (default: 20)")
    parser.add_argument("--norm", choices=NORMS, default="linf", help="attack norm (default: linf)")
    add_layers(parser, "layers to measure")
    parser.add_argument("--auto", choices=sorted(AUTO_KINDS), default="conv_linear",
                        help="what --layers auto selects: " + "; ".join(f"{k}: {v}" for k, v in AUTO_KINDS.items())
                             + " (default: conv_linear)")
    parser.add_argument("--metric", choices=METRICS, default="l1", help="distance between benign and adversarial maps (default: l1)")
    parser.add_argument("--relative", action="store_true", help="divide l1/l2 by the benign map's mean absolute value")
    parser.add_argument("--channel-dim", type=int, default=None,
                        help="dim of the neurons of layers whose module does not say it: 1 for [N, C, ...], -1 for "
                             "[N, T, C]; refused for a layer whose module says otherwise (default: inferred per "
                             "layer; Linear: last dim, conv: dim 1)")
    add_logits(parser)
    parser.add_argument("--top", type=positive_int, default=3, help="most sensitive neurons to print per layer (default: 3)")
    parser.add_argument("--label", help="name of this model in tables and plots (default: the checkpoint's folder name)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="REPORT",
                        help="report.json files of other models for the same plots and a comparison table (ratios are to the first)")
    parser.add_argument("--device", type=device, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random start (default: 0)")
    parser.add_argument("--out", type=out_dir, required=True, metavar="DIR", help="folder for report.json, CSVs and PNGs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _print_summary(report, top):
    print(f"{report.meta['model']} ({report.meta.get('label')}), {report.meta['samples']} samples, "
          f"attack {report.meta['attack']}, metric {report.meta['metric']}")
    if "clean_accuracy" in report.meta:
        print(f"accuracy: clean {report.meta['clean_accuracy']:.4f}, adversarial {report.meta['adversarial_accuracy']:.4f}")
    overlap = report.split_half_overlap(0.1)
    width = max(len("layer"), *(len(name) for name in report.layers))
    print(f"{'layer':<{width}}  {'neurons':>7}  {'mean':>10}  {'stderr':>8}  {'max':>10}  {'split-half':>10}  most sensitive")
    for name, values in report.sensitivity.items():
        listed = ", ".join(map(str, report.topk(name, min(top, values.numel())).indices.tolist()))
        print(f"{name:<{width}}  {values.numel():>7}  {values.mean().item():>10.4g}  {report.layer_stderr[name]:>8.2g}  "
              f"{values.max().item():>10.4g}  {overlap[name]:>10.2f}  {listed}")
    print("stderr: standard error of the layer's mean; split-half: fraction of the layer's top 10% that the even- and "
          "odd-numbered samples share")


def _check_comparable(paths, reports, metric, relative):
    """Each --compare report must measure the distance this run will, checked before measuring."""
    from ..report import distance_name

    distance = distance_name(metric, relative)
    for path, report in zip(paths, reports):
        theirs = distance_name(report.meta.get("metric"), report.meta.get("relative"))
        if theirs != distance:
            raise ValueError(f"--compare {path}: it measures {theirs} distances, this run {distance}; give the same "
                             "--metric and --relative")


def run(args):
    import torch

    from .. import data
    from . import first_samples
    from ..attacks import make_attack
    from ..checkpoint import check_fits, load_checkpoint, model_from_state, trained_on, training_eps
    from ..env import default_device
    from ..plots import save_plots
    from ..report import SensitivityReport, compare
    from ..sensitivity import describe, measure

    device = default_device(args.device)
    try:
        others = [SensitivityReport.from_json(path) for path in args.compare]
        state = load_checkpoint(args.model)
        data_name = trained_on(state, args.model, args.data)
        eps = training_eps(state, args.model, args.eps)
        _check_comparable(args.compare, others, args.metric, args.relative)
        dataset = first_samples(data.load(data_name, train=args.split == "train", root=args.root), args)
        model = model_from_state(state, args.model, device, args.arch, dataset)
        check_fits(model, dataset, args.model)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"neurosens sensitivity: {err}") from None

    attack = make_attack(args.attack, model, eps, args.norm, args.alpha, args.steps, num_classes=dataset.num_classes,
                         seed=args.seed, logits=args.logits)
    label = args.label or os.path.basename(os.path.dirname(os.path.abspath(args.model))) or "model"
    torch.manual_seed(args.seed)
    try:
        report = measure(
            model,
            data.make_loader(dataset, args.batch_size),
            attack,
            layers=args.layers,
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
    budgets = {r.meta.get("eps") for r in reports}
    for i, r in enumerate(reports):
        name = label if r is report else r.meta.get("label") or f"report {i + 1}"
        if len(budgets) > 1:  # sensitivities under different budgets: each column says its own
            name += f" (eps {r.meta['eps']:g})" if r.meta.get("eps") is not None else " (eps not recorded)"
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
