"""Sensitivity and intervention figures as PNGs.

Plots draw on matplotlib ``Figure`` objects with the Agg canvas, so they never touch pyplot's
global backend or open a window.
"""
import math
import os

import numpy as np
import torch

from .report import Z95, as_reports, ensure_parent, union_layers


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path):
    if path is not None:
        ensure_parent(path)
        fig.savefig(path)
    return fig


def _wrap(name, width=26):
    """A layer name broken at its dots into lines of at most ``width`` characters, so long names
    do not run into their neighbours."""
    lines, line = [], ""
    for part in name.split("."):
        piece = part if not line else "." + part
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line += piece
    return "\n".join(lines + [line])


def _line_styles(count):
    """A (color, dash) pair per line, distinct for up to 40 lines: ten colors, then the next dash."""
    from matplotlib import colormaps

    colors, dashes = colormaps["tab10"].colors, ["-", "--", ":", "-."]
    return [(colors[i % 10], dashes[(i // 10) % len(dashes)]) for i in range(count)]


def _metric_label(reports):
    metric = reports[0].meta.get("metric", "l1")
    relative = " (relative)" if reports[0].meta.get("relative") else ""
    return f"sensitivity, {metric}{relative}"


def plot_layer_means(reports, labels=None, path=None, log=None, title="Mean neuron sensitivity per layer", band=True):
    """Per-layer mean sensitivity, one line per model, layers in network order. Returns the Figure.

    ``log=None`` picks a log axis when the values span more than 20x, so that robust models do not
    flatten against a standard one. ``band=True`` shades the 95% interval of each mean (mean -+
    1.96 standard errors) for the reports that carry standard errors, and the title says so."""
    reports, labels = as_reports(reports, labels)
    layers = union_layers(reports)
    if log is None:
        values = [v for r in reports for v in r.layer_means().values() if v > 0]
        log = bool(values) and max(values) > 20 * min(values)
    fig = _figure(max(6.0, 0.32 * len(layers) + 2.5), 4.2)
    ax = fig.subplots()
    banded = False
    for label, report in zip(labels, reports):
        means = report.layer_means()
        means = [means.get(name, math.nan) for name in layers]
        line, = ax.plot(range(len(layers)), means, marker="o", ms=4, label=label)
        if band and report.layer_stderr is not None:
            _band(ax, range(len(layers)), means, [report.layer_stderr.get(name, math.nan) for name in layers],
                  line.get_color())
            banded = True
    if banded:
        title += "\n(shaded: 95% interval of each mean)"
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(_metric_label(reports))
    ax.set_xlabel("layer")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if len(reports) > 1:
        ax.legend()
    return _save(fig, path)


def _pick_layers(reports, layers, most=12):
    """The requested layers, or up to ``most`` spread evenly through the network."""
    available = union_layers(reports)
    if layers is None:
        if len(available) <= most:
            return available
        step = (len(available) - 1) / (most - 1)
        return [available[round(i * step)] for i in range(most)]
    missing = [name for name in layers if name not in available]
    if missing:
        raise KeyError(f"no layer {', '.join(map(repr, missing))} in the reports; they have {', '.join(available)}")
    return list(layers)


def plot_histograms(reports, labels=None, layers=None, path=None, bins=30):
    """Per-layer histograms of neuron sensitivity (one panel per layer, models overlaid).

    ``layers`` picks the panels; by default up to 12 layers spread evenly through the network, and
    the figure's title says how many of how many are shown."""
    reports, labels = as_reports(reports, labels)
    available, chosen_by_caller = len(union_layers(reports)), layers is not None
    layers = _pick_layers(reports, layers)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(3.0 * cols + 0.5, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        present = [(label, r[layer].double()) for label, r in zip(labels, reports) if layer in r]
        finite = [(label, v[torch.isfinite(v)]) for label, v in present]
        values = torch.cat([v for _, v in finite])
        lo, hi = (values.min().item(), values.max().item()) if values.numel() else (0.0, 1.0)
        # float64 edges from the float64 extremes: float32 ones could leave the smallest value out.
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1)
        for label, v in finite:
            ax.hist(v.numpy(), bins=edges, alpha=0.6 if len(present) > 1 else 0.9, label=label)
        dropped = max(v.numel() - f.numel() for (_, v), (_, f) in zip(present, finite))
        note = f", {dropped} not finite" if dropped else ""
        ax.set_title(f"{_wrap(layer)} ({present[0][1].numel()} neurons{note})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=4)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    fig.supxlabel(_metric_label(reports), fontsize=9)
    fig.supylabel("neurons", fontsize=9)
    if not chosen_by_caller and len(layers) < available:
        fig.suptitle(f"{len(layers)} of {available} layers, spread evenly through the network (layers= picks others)",
                     fontsize=9)
    if len(reports) > 1:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_sorted(reports, labels=None, layers=None, path=None, log=True, band=True):
    """Sorted sensitivity curves: each layer's neurons from most to least sensitive, against their
    rank as a fraction of the layer, so layers of any width share the axis; one panel per model.
    Every layer keeps its own color and dash and its name in the legend. ``band=True`` shades each
    neuron's 95% interval (-+ 1.96 standard errors) around the curves of reports that carry
    standard errors, and the panel's title says so."""
    reports, labels = as_reports(reports, labels)
    layers = _pick_layers(reports, layers, most=len(union_layers(reports)))
    columns = math.ceil(len(layers) / 22)
    fig = _figure(4.6 * len(reports) + 1.6 * columns + 0.4, max(4.0, 0.16 * min(len(layers), 22) + 1.0))
    axes = fig.subplots(1, len(reports), squeeze=False, sharey=True).ravel()
    styles = dict(zip(layers, _line_styles(len(layers))))
    handles = {}
    for ax, label, report in zip(axes, labels, reports):
        for layer in layers:
            if layer not in report:
                continue
            v, order = torch.sort(report[layer], descending=True, stable=True)
            x = (torch.arange(v.numel(), dtype=torch.float64) + 0.5) / v.numel()
            color, dash = styles[layer]
            handles[layer], = ax.plot(x.numpy(), v.numpy(), color=color, ls=dash, lw=1.2, label=layer)
            if band and report.stderr is not None:
                _band(ax, x.tolist(), v.tolist(), report.stderr[layer][order].tolist(), color)
        banded = band and report.stderr is not None
        ax.set_title(label + ("\n(shaded: 95% interval of each neuron)" if banded else ""))
        ax.set_xlabel("neuron rank (fraction of layer)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].set_ylabel(_metric_label(reports))
    shown = [layer for layer in layers if layer in handles]
    fig.legend([handles[layer] for layer in shown], shown, loc="outside right upper", fontsize=7, ncols=columns,
               title="layer", title_fontsize=8)
    return _save(fig, path)


def _band(ax, x, means, stderr, color):
    """Shade mean -+ Z95 * stderr (95% normal intervals) behind a line of means."""
    low = [m - Z95 * e for m, e in zip(means, stderr)]
    high = [m + Z95 * e for m, e in zip(means, stderr)]
    ax.fill_between(list(x), low, high, color=color, alpha=0.18, lw=0)


def save_plots(reports, out_dir, labels=None, prefix=""):
    """All three plots as PNGs in ``out_dir``; returns their paths."""
    paths = {
        "layer_means": os.path.join(out_dir, f"{prefix}layer_means.png"),
        "histograms": os.path.join(out_dir, f"{prefix}histograms.png"),
        "sorted": os.path.join(out_dir, f"{prefix}sorted.png"),
    }
    plot_layer_means(reports, labels, path=paths["layer_means"])
    plot_histograms(reports, labels, path=paths["histograms"])
    plot_sorted(reports, labels, path=paths["sorted"])
    return paths


def plot_intervention_curves(curves, path=None, title=None):
    """Accuracy against the number of edited neurons: one panel per mode of ``curves`` (``{mode:
    {selection: intervention_curve result}}``), one line per selection."""
    modes = list(curves)
    fig = _figure(5.2 * len(modes), 5.0)
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
        # Below the axes, so that it hides neither a curve nor the no-intervention lines.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    return _save(fig, path)


def plot_monitor(runs, labels=None, path=None, title=None, log=True):
    """Sensitivity while training: each layer's mean sensitivity on the probe against the training
    step, beside the probe's robust (solid) and clean (dashed) accuracy.

    ``runs`` is one run's monitor records (:attr:`neurosens.monitor.SensitivityMonitor.history`, or
    the ``monitor`` entries of a run's metrics.jsonl), a list of such runs with ``labels``, or
    ``{label: records}``. One run draws all its layers in one panel; several runs get one panel per
    layer (up to 8, spread through the network), one color per run. Returns the Figure."""
    if isinstance(runs, dict):
        labels, runs = list(runs), list(runs.values())
    elif runs and isinstance(runs[0], dict):
        runs, labels = [runs], [labels] if isinstance(labels, str) else [None]
    else:
        labels = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(runs))]
    if not runs or not all(runs):
        raise ValueError("plot_monitor: a run has no monitor records to plot")
    if len(labels) != len(runs):
        raise ValueError(f"plot_monitor: {len(labels)} labels for {len(runs)} runs")
    layers = list(dict.fromkeys(layer for records in runs for r in records for layer in r["sensitivity"]))
    if len(runs) == 1:
        panels = [None]
    else:
        step = max((len(layers) - 1) / 7, 1)
        panels = list(dict.fromkeys(layers[round(i * step)] for i in range(min(8, len(layers)))))
    count = len(panels) + 1
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = _figure(3.6 * cols + 0.4, 2.9 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    run_colors = [color for color, _ in _line_styles(len(runs))]
    metric = "sensitivity (mean over neurons)"
    for ax, panel in zip(axes, panels):
        for color, label, records in zip(run_colors, labels, runs):
            steps = [r["step"] for r in records]
            if panel is None:
                for layer, (layer_color, dash) in zip(layers, _line_styles(len(layers))):
                    ax.plot(steps, [r["sensitivity"].get(layer, math.nan) for r in records], color=layer_color, ls=dash,
                            marker=".", ms=3, label=layer)
            else:
                ax.plot(steps, [r["sensitivity"].get(panel, math.nan) for r in records], color=color, marker=".", ms=3,
                        label=label)
        ax.set_title("every layer" if panel is None else _wrap(panel), fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if panel is None or panel == panels[0]:
            ax.legend(fontsize=7)
    acc = axes[len(panels)]
    for color, label, records in zip(run_colors, labels, runs):
        steps = [r["step"] for r in records]
        name = f"{label}: " if label else ""
        acc.plot(steps, [r["robust"] for r in records], color=color, marker=".", ms=3, label=f"{name}robust")
        acc.plot(steps, [r["clean"] for r in records], color=color, ls="--", alpha=0.7, label=f"{name}clean")
    acc.set_title("probe accuracy", fontsize=9)
    acc.set_ylabel("accuracy", fontsize=8)
    acc.set_ylim(0, 1.02)
    acc.grid(alpha=0.3)
    acc.tick_params(labelsize=7)
    acc.legend(fontsize=7)
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.supxlabel("training step", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_frontier(summaries, path=None, title=None, attack="robust"):
    """Clean against robust accuracy, one curve per method through its Pareto front
    (:mod:`neurosens.frontier`): error bars are 95% intervals on both accuracies, points off the
    front are hollow, and each point is labelled with its knob value."""
    from .frontier import method_front

    if not summaries:
        raise ValueError("plot_frontier: no summaries to plot")
    methods = sorted({s.method for s in summaries})
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    for i, (method, (color, _)) in enumerate(zip(methods, _line_styles(len(methods)))):
        rows = [s for s in summaries if s.method == method]
        front = method_front(summaries, method)
        ax.plot([100 * s.clean for s in front], [100 * s.robust for s in front], color=color, marker="o", label=method)
        for s in rows:
            hollow = s not in front
            ax.errorbar(100 * s.clean, 100 * s.robust, xerr=100 * Z95 * s.clean_se, yerr=100 * Z95 * s.robust_se,
                        color=color, marker="o", mfc="white" if hollow else color, capsize=2, lw=0.8)
            # Labels of alternate methods right and left of their points, so neighbouring curves' labels do not meet.
            ax.annotate(s.label, (100 * s.clean, 100 * s.robust), textcoords="offset points",
                        xytext=(4 if i % 2 == 0 else -4, 4), ha="left" if i % 2 == 0 else "right", fontsize=7, color=color)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{attack} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
