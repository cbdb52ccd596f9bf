"""`neurosens report`: several trained models side by side in one HTML page with its PNGs."""
import os

HELP = ("Compare trained models: robustness table, per-layer neuron sensitivity (means, histograms) and "
        "intervention curves, written as a self-contained HTML page, PNGs and JSON.")


def add_arguments(parser):
    from ..data import DATASETS
    from . import count_or_zero, device, non_negative, out_dir, positive_int

    parser.add_argument("--models", nargs="+", required=True, help="model.pt or checkpoint.pt files from `neurosens train`")
    parser.add_argument("--labels", nargs="+", help="one name per model (default: each file's folder name)")
    parser.add_argument("--out", type=out_dir, required=True, help="output folder")
    parser.add_argument("--eps", type=non_negative, required=True, help="L-inf attack budget in pixel units")
    parser.add_argument("--data", choices=sorted(DATASETS), help="data set (default: the one the first model was trained on)")
    parser.add_argument("--root", help="data root (default: $NEUROSENS_DATA or ./data)")
    parser.add_argument("-n", "--num", type=count_or_zero, default=1000, help="first N test images (default: 1000; 0 for all)")
    parser.add_argument("--steps", type=positive_int, default=20, help="PGD and CW steps (default: 20)")
    parser.add_argument("--layers", default="auto", help="comma-separated layer names, or auto (default)")
    parser.add_argument("--intervene-on", help="label of the model the interventions run on (default: the first)")
    parser.add_argument("--intervene-layer", help="layer the interventions edit (default: the last hidden one)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="random selections averaged per point (default: 3)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args):
    import torch

    from .. import data as datasets
    from ..study import run_study
    from ..checkpoint import load_checkpoint, load_model, trained_on
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
    try:
        data_name = trained_on(load_checkpoint(args.models[0]), args.models[0], args.data)
    except ValueError as err:
        raise SystemExit(f"neurosens report: {err}") from None
    models = {label: load_model(path, device) for label, path in zip(labels, args.models)}
    test_set = datasets.load(data_name, train=False, root=args.root)
    if args.num:
        test_set = torch.utils.data.Subset(test_set, range(min(args.num, len(test_set))))
    layers = "auto" if args.layers == "auto" else [name.strip() for name in args.layers.split(",") if name.strip()]
    summary = run_study(models, test_set, args.eps, args.out, layers=layers, intervention_model=args.intervene_on,
                        intervention_layer=args.intervene_layer, seeds=args.seeds, steps=args.steps,
                        title=f"neurosens report ({data_name}, eps {args.eps:g})")
    inter = summary["interventions"]
    print(f"\n{data_name}, {summary['test_images']} test images, eps {args.eps:g}")
    for label, row in summary["robustness"].items():
        print(f"{label:12s} " + "  ".join(f"{c} {100 * v:.1f}%" for c, v in row.items() if c != "n"))
    print(f"interventions on {inter['model']}, layer {inter['layer']}:")
    for name, v in inter["at_10_percent"].items():
        print(f"  {name:15s} k={v['k']:<4d} benign {100 * v['benign']:5.1f}%  adversarial {100 * v['adversarial']:5.1f}%")
    print(f"report: {os.path.join(args.out, 'index.html')}")
    return 0
