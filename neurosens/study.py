"""A study of several models side by side: robustness, neuron sensitivity and interventions.

:func:`run_study` attacks each model once per measurement, measures the per-neuron sensitivity of
the chosen layers, runs the intervention curves (repair and zero; most sensitive, random and
least sensitive neurons) on one model and layer, and writes everything to one folder:
``index.html`` (self-contained, images inlined), the PNGs, ``results.json`` and one
``<label>.report.json`` per model.
"""
import base64
import html
import json
import os
import time

from .attacks import CW, FGSM, PGD
from .data import make_loader
from .interventions import adversarial_batches, intervention_curve
from .report import _figure, _save, compare, save_plots
from .sensitivity import measure
from .training import evaluate

MODES = ("repair", "zero")
SELECTIONS = ("top", "random", "bottom")


def robustness(models, loader, eps, steps=20, progress=True):
    """``{label: {"n", "clean", "fgsm", "pgd-<steps>", "cw"}}`` accuracies on ``loader``."""
    table = {}
    for label, model in models.items():
        attacks = {"fgsm": FGSM(model, eps), f"pgd-{steps}": PGD(model, eps, steps=steps), "cw": CW(model, eps, steps=steps)}
        table[label] = evaluate(model, loader, attacks, progress=progress)
    return table


def plot_intervention_curves(curves, path=None, title=None):
    """Accuracy against the number of edited neurons: one panel per mode, one line per selection."""
    modes = [m for m in MODES if m in curves]
    fig = _figure(5.2 * len(modes), 4.0)
    styles = {"top": ("tab:red", "most sensitive"), "random": ("tab:gray", "random"), "bottom": ("tab:blue", "least sensitive")}
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1)
        for selection, curve in curves[mode].items():
            color, name = styles[selection]
            ax.plot(curve["k"], curve["adversarial"], "-o", color=color, label=f"{name}: adversarial")
            if mode == "zero":
                ax.plot(curve["k"], curve["benign"], "--", color=color, alpha=0.7, label=f"{name}: benign")
            if selection == "random":
                low = [m - s for m, s in zip(curve["adversarial"], curve["adversarial_std"])]
                high = [m + s for m, s in zip(curve["adversarial"], curve["adversarial_std"])]
                ax.fill_between(curve["k"], low, high, color=color, alpha=0.2)
        any_curve = next(iter(curves[mode].values()))
        base_benign, base_adv = any_curve["baseline"]
        ax.axhline(base_adv, color="black", lw=0.8, ls=":", label="no intervention: adversarial")
        if mode == "zero":
            ax.axhline(base_benign, color="black", lw=0.8, ls="-.", label="no intervention: benign")
        ax.set_xlabel(f"neurons {'repaired' if mode == 'repair' else 'zeroed'} in {any_curve['layer']}")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{mode}" + (f" ({title})" if title else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _table_html(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(path, alt):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_html(path, title, summary, robust, comparison, plots, curve_plot, notes):
    """The study as one self-contained HTML page."""
    labels = list(robust)
    columns = [c for c in next(iter(robust.values())) if c != "n"]
    robust_rows = [[label] + [f"{100 * robust[label][c]:.1f}%" for c in columns] for label in labels]
    comp_rows = comparison.rows()
    comp_header = list(comp_rows[0])
    comp_cells = [[row["layer"]] + [f"{row[h]:.4g}" for h in comp_header[1:]] for row in comp_rows]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
        "figcaption{color:#666;font-size:90%}.note{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(summary)}</p>",
        "<h2>Robustness</h2>",
        _table_html(["model"] + columns, robust_rows),
        "<h2>Neuron sensitivity</h2>",
        _table_html(comp_header, comp_cells),
    ]
    parts += [_image_html(p, alt) for alt, p in plots]
    parts += ["<h2>Interventions</h2>", _image_html(curve_plot, "intervention curves")]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _headline(curves, at=0.1):
    """Accuracies of the intervention closest to ``at`` of the layer's neurons."""
    out = {}
    for mode, by_selection in curves.items():
        for selection, curve in by_selection.items():
            num = curve["neurons"]
            i = min(range(len(curve["k"])), key=lambda j: abs(curve["k"][j] - at * num))
            out[f"{mode}/{selection}"] = {"k": curve["k"][i], "benign": curve["benign"][i], "adversarial": curve["adversarial"][i]}
    return out


def run_study(models, test_set, eps, out_dir, layers="auto", intervention_model=None, intervention_layer=None,
              ks=(0.02, 0.05, 0.1, 0.2, 0.5), seeds=3, steps=20, batch_size=128, title="neurosens study", progress=True):
    """Compare ``models`` (``{label: model}``) on ``test_set`` under L-inf attacks of budget ``eps``.

    The interventions run on ``intervention_model`` (default: the first model) and
    ``intervention_layer`` (default: the last measured layer before the output). Returns the
    summary written to ``results.json``.
    """
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    loader = make_loader(test_set, batch_size)
    robust = robustness(models, loader, eps, steps, progress)
    reports = {}
    for label, model in models.items():
        reports[label] = measure(model, loader, PGD(model, eps, steps=steps), layers=layers, progress=progress,
                                 meta={"label": label})
        reports[label].to_json(os.path.join(out_dir, f"{label}.report.json"))
    labels = list(models)
    comparison = compare([reports[label] for label in labels], labels)
    plot_paths = save_plots([reports[label] for label in labels], out_dir, labels)

    target = intervention_model or labels[0]
    report = reports[target]
    layer = intervention_layer or (report.layers[-2] if len(report.layers) > 1 else report.layers[0])
    model = models[target]
    batches = adversarial_batches(model, loader, PGD(model, eps, steps=steps), progress=progress)
    curves = {}
    for mode in MODES:
        curves[mode] = {}
        for selection in SELECTIONS:
            curve = intervention_curve(model, batches, layer, report, ks, selection, mode, seeds, progress=progress)
            curve["neurons"] = report[layer].numel()
            curves[mode][selection] = curve
    curve_path = os.path.join(out_dir, "interventions.png")
    plot_intervention_curves(curves, curve_path, f"{target}, {layer}")

    headline = _headline(curves)
    summary = {
        "eps": eps, "steps": steps, "test_images": len(test_set), "robustness": robust,
        "layer_means": {label: reports[label].layer_means() for label in labels},
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
