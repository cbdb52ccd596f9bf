"""`neurosens eval`: clean and robust accuracy of a trained model under several attacks."""
import json
import time

HELP = "Evaluate a checkpoint: clean accuracy and accuracy under FGSM, PGD-k, CW-Linf and AutoAttack; prints a table, writes JSON."

CHOICES = ("clean", "fgsm", "pgd", "cw", "autoattack")


def add_arguments(parser):
    from . import add_data, add_eps, add_logits, add_model, add_samples, device, out_file, positive, positive_int

    add_model(parser)
    add_data(parser)
    add_eps(parser)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"], help="(default: linf)")
    parser.add_argument("--attacks", default="clean,fgsm,pgd,cw,autoattack",
                        help=f"comma-separated, from {', '.join(CHOICES)} (default: all)")
    parser.add_argument("--steps", type=positive_int, default=40, help="PGD and CW steps (default: 40)")
    parser.add_argument("--alpha", type=positive, help="PGD and CW step size (default: 2.5 * eps / steps)")
    parser.add_argument("--restarts", type=positive_int, default=1, help="PGD and CW random restarts (default: 1)")
    add_samples(parser, 1000)
    add_logits(parser)
    parser.add_argument("--batch-size", type=positive_int, default=500, help="(default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts (default: 0)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", dest="json_out", type=out_file, help="write the results to this JSON file")


def run(args):
    import torch

    from .. import data as datasets
    from ..attacks import make_attack, require_torchattacks
    from ..checkpoint import load_checkpoint, model_from_state, trained_on, training_eps
    from ..env import default_device
    from ..evaluation import evaluate

    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = sorted(set(names) - set(CHOICES))
    if unknown:
        raise SystemExit(f"--attacks: unknown {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    if "autoattack" in names:
        try:
            require_torchattacks()
        except ImportError as err:
            raise SystemExit(f"neurosens eval: {err}, or leave it out of --attacks") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    state = load_checkpoint(args.model)
    model = model_from_state(state, args.model, device)
    meta = state.get("meta") or {}
    data_name = trained_on(state, args.model, args.data)
    eps = training_eps(state, args.model, args.eps)
    test_set = datasets.load(data_name, train=False, root=args.root).first(args.samples)
    loader = datasets.make_loader(test_set, args.batch_size)
    num_classes = meta.get("model", {}).get("num_classes", 10)

    rows = {}
    if "clean" in names:
        started = time.perf_counter()
        rows["clean"] = {"accuracy": evaluate(model, loader, {}, device, logits=args.logits)["clean"], "seconds": time.perf_counter() - started}
    labels = {"pgd": f"pgd-{args.steps}", "cw": f"cw-{args.steps}"}
    for name in (n for n in names if n != "clean"):
        label = labels.get(name, name)
        attack = make_attack(name, model, eps, args.norm, args.alpha, args.steps, args.restarts, num_classes, args.seed,
                             logits=args.logits)
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        result = evaluate(model, loader, {label: attack}, device, progress=True, logits=args.logits)
        rows[label] = {"accuracy": result[label], "seconds": time.perf_counter() - started}

    report = {"checkpoint": str(args.model), "data": data_name, "n": len(test_set), "eps": eps, "norm": args.norm,
              "steps": args.steps, "alpha": args.alpha, "restarts": args.restarts, "results": rows}
    print(f"{data_name}, {len(test_set)} test images, {args.norm} eps={eps:g}")
    print(f"{'attack':<12} {'accuracy':>9} {'time (s)':>9}")
    for label, row in rows.items():
        print(f"{label:<12} {100 * row['accuracy']:>8.2f}% {row['seconds']:>9.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0
