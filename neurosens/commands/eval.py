"""`neurosens eval`: clean and robust accuracy of a trained model under several attacks, the worst
case over them, and the gradient-masking checks."""
import argparse
import dataclasses
import json
import time

HELP = ("Evaluate a checkpoint: clean accuracy and accuracy under FGSM, PGD-k, CW-Linf, AutoAttack, Square and the "
        "neuron-targeted PGD; optionally the per-sample worst case and gradient-masking checks; prints a table, writes JSON.")

CHOICES = ("clean", "fgsm", "pgd", "cw", "autoattack", "square", "neuron-pgd", "feature-pgd")
#: The attacks that need the optional torchattacks package.
TORCHATTACKS = ("autoattack", "square")


def neuron_layers(text):
    """An SNS layer preset (auto, all, hidden, logits), or layers as ``--layers`` takes them."""
    from ..sns import LAYER_PRESETS
    from . import layer_list

    return text.strip() if text.strip() in LAYER_PRESETS else layer_list(text)


def neuron_k(text):
    """k as ``--sns-k`` takes it (a count, 8, or a fraction of each layer, 0.3), checked by SNS's rule."""
    from ..sns import SNSConfig

    parse = {field.name: field for field in dataclasses.fields(SNSConfig)}["k"].metadata["type"]
    try:
        value = parse(text)
        SNSConfig(k=value).check("neuron-pgd")
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def step_list(text):
    """At least two increasing step counts, comma-separated."""
    from . import positive_int

    steps = [positive_int(s.strip()) for s in text.split(",") if s.strip()]
    if len(steps) < 2 or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"give at least two increasing step counts, e.g. 10,20,40, got {text!r}")
    return steps


def add_arguments(parser):
    from ..reference import METRICS
    from ..sns import SNSConfig
    from . import add_data, add_eps, add_logits, add_model, add_samples, device, fraction, non_negative, out_file, positive, positive_int

    add_model(parser)
    add_data(parser)
    add_eps(parser)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"], help="(default: linf)")
    parser.add_argument("--attacks", default="clean,fgsm,pgd,cw,autoattack",
                        help=f"comma-separated, from {', '.join(CHOICES)} (default: clean,fgsm,pgd,cw,autoattack)")
    parser.add_argument("--steps", type=positive_int, default=40, help="PGD, CW and neuron-PGD steps (default: 40)")
    parser.add_argument("--alpha", type=positive, help="PGD, CW and neuron-PGD step size (default: 2.5 * eps / steps)")
    parser.add_argument("--restarts", type=positive_int, default=1, help="PGD, CW, neuron-PGD and Square restarts (default: 1)")
    add_samples(parser, 1000)
    add_logits(parser)
    parser.add_argument("--batch-size", type=positive_int, default=500, help="(default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts (default: 0)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", dest="json_out", type=out_file, help="write the results to this JSON file")
    adaptive = parser.add_argument_group("neuron-targeted attack (neuron-pgd, feature-pgd)")
    adaptive.add_argument("--neuron-layers", type=neuron_layers, default=SNSConfig.layers, metavar="LAYERS",
                          help="layers whose top-k neurons it pushes away from their benign outputs: auto or all (every "
                               "conv/linear), hidden, logits, or comma-separated names or patterns (default: auto, as SNS)")
    adaptive.add_argument("--neuron-k", type=neuron_k, default=SNSConfig.k,
                          help=f"neurons per layer: a count (8) or a fraction (0.1) (default: {SNSConfig.k}, as SNS)")
    adaptive.add_argument("--neuron-weight", type=non_negative, default=1.0,
                          help="weight of the neuron term beside the cross-entropy; feature-pgd uses it alone (default: 1)")
    adaptive.add_argument("--neuron-metric", choices=METRICS, default=SNSConfig.metric,
                          help=f"distance of a neuron from its benign output (default: {SNSConfig.metric})")
    adaptive.add_argument("--neuron-loss", choices=["ce", "cw"], default="ce",
                          help="neuron-pgd's classification loss: cross-entropy or the CW margin (default: ce)")
    parser.add_argument("--square-queries", type=positive_int, default=1000, help="Square queries per sample (default: 1000)")
    parser.add_argument("--worst-case", action="store_true",
                        help="also report the worst case: the fraction of images right on the clean input and under every chosen attack")
    masking = parser.add_argument_group("gradient-masking checks (--check-masking; need torchattacks for Square)")
    masking.add_argument("--check-masking", action="store_true",
                         help="run the checks: white-box PGD vs black-box Square, accuracy vs eps up to the whole "
                              "range, accuracy vs PGD steps")
    masking.add_argument("--masking-steps", type=step_list, default=[10, 20, 40], metavar="S1,S2[,...]",
                         help="PGD steps of the steps check (default: 10,20,40)")
    masking.add_argument("--masking-tol", type=fraction, default=0.01, help="accuracy slack of every check (default: 0.01)")


def run(args):
    import torch

    from .. import data as datasets
    from . import first_samples
    from ..attacks import make_attack, require_torchattacks
    from ..checkpoint import check_fits, load_checkpoint, model_from_state, trained_on, training_eps
    from ..env import default_device
    from ..evaluation import check_masking_options, evaluate, masking_checks, survived_all

    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not names:
        raise SystemExit(f"--attacks: no attack given; choose from {', '.join(CHOICES)}")
    unknown = sorted(set(names) - set(CHOICES))
    if unknown:
        raise SystemExit(f"--attacks: unknown {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    needs = [n for n in names if n in TORCHATTACKS] + (["--check-masking"] if args.check_masking else [])
    if needs:
        try:
            require_torchattacks(", ".join(needs))
        except ImportError as err:
            raise SystemExit(f"neurosens eval: {err}, or leave {', '.join(needs)} out (--attacks)") from None
    if "feature-pgd" in names and args.neuron_weight == 0:
        raise SystemExit("neurosens eval: --neuron-weight 0 leaves feature-pgd nothing to ascend; give a weight > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    state = load_checkpoint(args.model)
    model = model_from_state(state, args.model, device)
    meta = state.get("meta") or {}
    data_name = trained_on(state, args.model, args.data)
    eps = training_eps(state, args.model, args.eps)
    if args.check_masking:
        check_masking_options(eps, args.masking_steps, None, args.square_queries, args.masking_tol)
    num_classes = meta.get("model", {}).get("num_classes", 10)
    labels = {"pgd": f"pgd-{args.steps}", "cw": f"cw-{args.steps}", "neuron-pgd": f"neuron-pgd-{args.steps}",
              "feature-pgd": f"feature-pgd-{args.steps}"}
    neuron = {"layers": args.neuron_layers, "k": args.neuron_k, "weight": args.neuron_weight, "metric": args.neuron_metric}
    options = {"neuron-pgd": {**neuron, "loss": args.neuron_loss}, "feature-pgd": neuron, "square": {"queries": args.square_queries}}
    # Every attack is built, and so its options checked against the model, before any image is read.
    attacks = {labels.get(name, name): make_attack(
        name, model, eps, args.norm, args.alpha, args.steps, args.restarts, num_classes, args.seed, logits=args.logits,
        **options.get(name, {}))
        for name in names if name != "clean"}
    test_set = first_samples(datasets.load(data_name, train=False, root=args.root), args)
    check_fits(model, test_set, args.model)
    loader = datasets.make_loader(test_set, args.batch_size)

    rows, hits = {}, {}
    if "clean" in names or args.worst_case:
        started = time.perf_counter()
        result = evaluate(model, loader, {}, device, logits=args.logits, per_sample=True)
        rows["clean"] = {"accuracy": result["clean"], "seconds": time.perf_counter() - started}
        hits["clean"] = result["hits"]["clean"]
    for label, attack in attacks.items():
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        result = evaluate(model, loader, {label: attack}, device, progress=True, logits=args.logits, per_sample=True)
        rows[label] = {"accuracy": result[label], "seconds": time.perf_counter() - started}
        if hasattr(attack, "alpha"):  # the step size it ran with, --alpha or its default
            rows[label]["alpha"] = attack.alpha
        hits[label] = result["hits"][label]
    if args.worst_case:
        rows["worst"] = {"accuracy": survived_all(hits), "seconds": sum(row["seconds"] for row in rows.values())}

    report = {"checkpoint": str(args.model), "data": data_name, "n": len(test_set), "eps": eps, "norm": args.norm,
              "steps": args.steps, "alpha": args.alpha, "restarts": args.restarts, "results": rows}
    if any(n in names for n in ("neuron-pgd", "feature-pgd")):
        layers = args.neuron_layers
        shown = layers if isinstance(layers, str) else [s if isinstance(s, str) else f"nn.{s.__name__}" for s in layers]
        report["neuron"] = {**neuron, "layers": shown, "loss": args.neuron_loss}
    if args.worst_case:
        report["worst_case_over"] = list(hits)
    print(f"{data_name}, {len(test_set)} test images, {args.norm} eps={eps:g}")
    print(f"{'attack':<16} {'accuracy':>9} {'time (s)':>9}")
    for label, row in rows.items():
        print(f"{label:<16} {100 * row['accuracy']:>8.2f}% {row['seconds']:>9.1f}")
    if args.worst_case:
        print(f"worst: right on the clean input and under {', '.join(attacks) or 'no attack'}")
    if args.check_masking:
        report["masking"] = masking_checks(model, loader, eps, args.norm, args.masking_steps, queries=args.square_queries,
                                           tol=args.masking_tol, seed=args.seed, device=device, logits=args.logits)
        print_masking(report["masking"])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def print_masking(checks):
    """One line per gradient-masking check: its verdict and the numbers behind it."""
    def pct(values):
        return ", ".join(f"{100 * v:.1f}%" for v in values)

    black, curve, steps = checks["black_box"], checks["eps_curve"], checks["steps"]
    verdict = {True: "pass", False: "FAIL"}
    print(f"gradient-masking checks (tolerance {100 * checks['tol']:g} points):")
    print(f"  black-box  {verdict[black['passed']]}: white-box PGD {pct([black['white_box']])}, "
          f"Square ({black['queries']} queries) {pct([black['square']])}")
    print(f"  eps curve  {verdict[curve['passed']]}: PGD-{curve['steps']} at eps {', '.join(f'{e:g}' for e in curve['eps'])}: "
          f"{pct(curve['accuracy'])}")
    print(f"  steps      {verdict[steps['passed']]}: PGD at steps {', '.join(map(str, steps['steps']))}: {pct(steps['accuracy'])}")
    print(f"  overall    {verdict[checks['passed']]}")
