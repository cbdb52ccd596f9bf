"""`neurosens report`: several trained models side by side in one HTML page with its PNGs."""
import os

HELP = ("Compare trained models: robustness table, per-layer neuron sensitivity (means, histograms) and "
        "intervention curves, written as a self-contained HTML page, PNGs and JSON.")


def add_arguments(parser):
    from . import add_data, add_eps, add_layers, add_logits, add_model, add_samples, device, out_dir, positive_int

    add_model(parser, many=True)
    parser.add_argument("--labels", nargs="+", help="one name per model (default: each file's folder name)")
    parser.add_argument("--out", type=out_dir, required=True, help="output folder")
    add_eps(parser, "the eps the models were trained with, when they agree")
    add_data(parser, "the one the first model was trained on")
    add_samples(parser, 1000)
    parser.add_argument("--steps", type=positive_int, default=20, help="PGD and CW steps (default: 20)")
    add_layers(parser, "layers to measure")
    add_logits(parser)
    parser.add_argument("--intervene-on", help="label of the model the interventions run on (default: the first)")
    parser.add_argument("--intervene-layer", help="layer the interventions edit (default: the last hidden one)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="random selections averaged per point (default: 3)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args):
    import torch

    from .. import data as datasets
    from . import first_samples
    from ..study import run_study
    from ..checkpoint import check_fits, load_checkpoint, model_from_state, trained_on, training_eps
    from ..env import default_device

    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.models]
    if len(labels) != len(args.models):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.models)} models; give one per model")
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--labels: names must differ, got {' '.join(labels)}")
    if args.intervene_on and args.intervene_on not in labels:
        raise SystemExit(f"--intervene-on: {args.intervene_on!r} is not one of the labels {', '.join(labels)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    states = [load_checkpoint(path) for path in args.models]
    data_name = trained_on(states[0], args.models[0], args.data)
    if args.eps is None:
        trained = {path: training_eps(state, path) for path, state in zip(args.models, states)}
        if len(set(trained.values())) > 1:
            raise SystemExit("neurosens report: the models were trained with different eps ("
                             + ", ".join(f"{path}: {eps:g}" for path, eps in trained.items()) + "); give --eps")
    eps = training_eps(states[0], args.models[0], args.eps)
    models = {label: model_from_state(state, path, device) for label, path, state in zip(labels, args.models, states)}
    test_set = first_samples(datasets.load(data_name, train=False, root=args.root), args)
    for path, model in zip(args.models, models.values()):
        check_fits(model, test_set, path)
    summary = run_study(models, test_set, eps, args.out, layers=args.layers, intervention_model=args.intervene_on,
                        intervention_layer=args.intervene_layer, seeds=args.seeds, steps=args.steps,
                        title=f"neurosens report ({data_name}, eps {eps:g})", logits=args.logits)
    inter = summary["interventions"]
    print(f"\n{data_name}, {summary['test_images']} test images, eps {eps:g}")
    for label, row in summary["robustness"].items():
        print(f"{label:12s} " + "  ".join(f"{c} {100 * v:.1f}%" for c, v in row.items() if c != "n"))
    print(f"interventions on {inter['model']}, layer {inter['layer']}:")
    for name, v in inter["at_10_percent"].items():
        print(f"  {name:15s} k={v['k']:<4d} benign {100 * v['benign']:5.1f}%  adversarial {100 * v['adversarial']:5.1f}%")
    print(f"report: {os.path.join(args.out, 'index.html')}")
    return 0
