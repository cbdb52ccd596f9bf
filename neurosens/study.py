"""A study of several models side by side: robustness, neuron sensitivity and interventions.

:func:`run_study` attacks each model once per measurement, measures the per-neuron sensitivity of
the chosen layers, runs the intervention curves (repair and zero; most sensitive, random and
least sensitive neurons) on one model and layer, and writes everything to one folder:
``index.html`` (self-contained, images inlined), the PNGs, ``results.json`` and one
``<label>.report.json`` per model (the label reduced to a safe file name).
"""
import json
import os
import re
import time
from pathlib import Path

from .attacks import PGD
from .data import make_loader
from .evaluation import robustness
from .interventions import SELECTIONS, adversarial_batches, intervention_curve
from .page import write_html
from .plots import plot_intervention_curves, save_plots
from .report import compare
from .sensitivity import measure

#: The intervention modes a study runs (see :mod:`neurosens.interventions`).
MODES = ("repair", "zero")


def _headline(curves, at=0.1):
    """Accuracies of the intervention closest to ``at`` of the layer's neurons."""
    out = {}
    for mode, by_selection in curves.items():
        for selection, curve in by_selection.items():
            num = curve["neurons"]
            i = min(range(len(curve["k"])), key=lambda j: abs(curve["k"][j] - at * num))
            out[f"{mode}/{selection}"] = {"k": curve["k"][i], "benign": curve["benign"][i], "adversarial": curve["adversarial"][i]}
    return out


def report_files(out_dir, labels):
    """``{label: path of its report.json}``: one file per label directly in ``out_dir``, its name
    made of the label's letters, digits, ``.``, ``_`` and ``-`` (so no label reaches another folder),
    made unique by a number where two labels come out alike."""
    paths, taken = {}, set()
    for label in labels:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._")[:100] or "model"
        name, n = stem, 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.lower())
        paths[label] = Path(out_dir) / f"{name}.report.json"
    return paths


def run_study(models, test_set, eps, out_dir, layers="auto", intervention_model=None, intervention_layer=None,
              ks=(0.02, 0.05, 0.1, 0.2, 0.5), seeds=3, steps=20, batch_size=128, title="neurosens study", progress=True, logits=None):
    """Compare ``models`` (``{label: model}``) on ``test_set`` under L-inf attacks of budget ``eps``.

    The interventions run on ``intervention_model`` (default: the first model) and
    ``intervention_layer`` (default: the last measured layer before the output). ``logits`` says
    where the models' outputs hold the logits (:mod:`neurosens.outputs`). Returns the summary
    written to ``results.json``.
    """
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    loader = make_loader(test_set, batch_size)
    robust = robustness(models, loader, eps, steps, progress, logits)
    reports, files = {}, report_files(out_dir, models)
    for label, model in models.items():
        reports[label] = measure(model, loader, PGD(model, eps, steps=steps, logits=logits), layers=layers, progress=progress,
                                 meta={"label": label})
        reports[label].to_json(files[label])
    labels = list(models)
    comparison = compare([reports[label] for label in labels], labels)
    plot_paths = save_plots([reports[label] for label in labels], out_dir, labels)

    target = intervention_model or labels[0]
    report = reports[target]
    layer = intervention_layer or (report.layers[-2] if len(report.layers) > 1 else report.layers[0])
    model = models[target]
    batches = adversarial_batches(model, loader, PGD(model, eps, steps=steps, logits=logits), progress=progress)
    curves = {}
    for mode in MODES:
        curves[mode] = {}
        for selection in SELECTIONS:
            curve = intervention_curve(model, batches, layer, report, ks, selection, mode, seeds, progress=progress,
                                       logits=logits)
            curve["neurons"] = report[layer].numel()
            curves[mode][selection] = curve
    curve_path = os.path.join(out_dir, "interventions.png")
    plot_intervention_curves(curves, curve_path, f"{target}, {layer}")

    headline = _headline(curves)
    summary = {
        "eps": eps, "steps": steps, "test_images": len(test_set), "robustness": robust,
        "layer_means": {label: reports[label].layer_means() for label in labels},
        "layer_stderr": {label: {layer: float(se) for layer, se in (reports[label].layer_stderr or {}).items()}
                         for label in labels},
        "interventions": {"model": target, "layer": layer, "curves": curves, "at_10_percent": headline},
        "seconds": time.perf_counter() - started,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    notes = [
        f"Interventions on {target}, layer {layer} ({report[layer].numel()} neurons), about 10% of its neurons: "
        + "; ".join(f"{name}: benign {100 * v['benign']:.1f}%, adversarial {100 * v['adversarial']:.1f}% (k={v['k']})"
                    for name, v in headline.items()) + "."
    ]
    plots = [("per-layer mean sensitivity", plot_paths["layer_means"]), ("per-layer histograms", plot_paths["histograms"]),
             ("sorted sensitivity", plot_paths["sorted"])]
    write_html(os.path.join(out_dir, "index.html"), title,
               f"{len(test_set)} test images, L-inf eps {eps}, PGD-{steps}; sensitivity is the mean absolute change "
               "of each neuron's output between benign and adversarial inputs.",
               robust, comparison, plots, curve_path, notes)
    return summary
