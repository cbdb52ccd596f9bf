"""Sensitivity reports: rankings, per-layer means, JSON/CSV files, comparisons and PNG plots.

Plots draw on matplotlib ``Figure`` objects with the Agg canvas, so they never touch pyplot's
global backend or open a window.
"""
import csv
import json
import math
import os

import torch

from .selection import ranks, resolve_k, topk

FORMAT = "neurosens.sensitivity/1"


class SensitivityReport:
    """Per-layer, per-neuron sensitivity (``report[layer]`` is a float64 [C] tensor) plus metadata.

    ``meta`` holds what produced it: ``metric``, ``relative``, ``samples``, ``model``, ``attack``,
    per-layer output ``shape`` under ``layers``, and anything the caller adds.
    """

    def __init__(self, sensitivity, meta=None):
        if not sensitivity:
            raise ValueError("SensitivityReport: no layers")
        self.sensitivity = {}
        for name, values in sensitivity.items():
            values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(f"SensitivityReport: layer {name!r} needs a non-empty 1-D tensor of neurons, got shape {list(values.shape)}")
            self.sensitivity[name] = values
        self.meta = dict(meta or {})

    @property
    def layers(self):
        return list(self.sensitivity)

    def __getitem__(self, layer):
        return self.sensitivity[self._check_layer(layer)]

    def __contains__(self, layer):
        return layer in self.sensitivity

    def __len__(self):
        return len(self.sensitivity)

    def __repr__(self):
        neurons = sum(v.numel() for v in self.sensitivity.values())
        return (
            f"SensitivityReport({len(self)} layers, {neurons} neurons, metric={self.meta.get('metric')!r}, "
            f"samples={self.meta.get('samples')}, model={self.meta.get('model')!r})"
        )

    def _check_layer(self, layer):
        if layer not in self.sensitivity:
            raise KeyError(f"SensitivityReport: no layer {layer!r}; it has {', '.join(self.sensitivity)}")
        return layer

    def topk(self, layer, k=0.1, largest=True):
        """The ``k`` (count or fraction; default 10%) most sensitive neurons of ``layer``, most first.

        Ties are broken by the lower neuron index, so rankings are reproducible.
        """
        values = self[layer]
        return topk(values, resolve_k(k, values.numel(), f"SensitivityReport.topk({layer!r})"), largest)

    def bottomk(self, layer, k=0.1):
        """The ``k`` least sensitive neurons of ``layer``, least first."""
        return self.topk(layer, k, largest=False)

    def layer_means(self):
        """``{layer: mean sensitivity over its neurons}`` in layer order."""
        return {name: v.mean().item() for name, v in self.sensitivity.items()}

    def table(self):
        """A markdown table of each layer's neurons, mean, median and max sensitivity."""
        lines = ["| layer | neurons | mean | median | max |", "|---|---:|---:|---:|---:|"]
        for name, v in self.sensitivity.items():
            lines.append(f"| {name} | {v.numel()} | {v.mean().item():.4g} | {v.median().item():.4g} | {v.max().item():.4g} |")
        return "\n".join(lines)

    def to_dict(self):
        return {
            "format": FORMAT,
            "meta": self.meta,
            "sensitivity": {name: v.tolist() for name, v in self.sensitivity.items()},
        }

    @classmethod
    def from_dict(cls, data):
        if data.get("format") != FORMAT:
            raise ValueError(f"SensitivityReport: expected format {FORMAT!r}, got {data.get('format')!r}")
        return cls(data["sensitivity"], data.get("meta"))

    def to_json(self, path=None):
        """The report as JSON text (floats round-trip exactly); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            _write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source):
        """Load a report from a JSON file path or from JSON text."""
        if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
            with open(source) as f:
                source = f.read()
        return cls.from_dict(json.loads(source))

    def to_csv(self, path):
        """One row per neuron: layer, neuron, sensitivity, rank (1 = most sensitive in its layer)."""
        _make_parent(path)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "neuron", "sensitivity", "rank"])
            for name, v in self.sensitivity.items():
                for neuron, (value, r) in enumerate(zip(v.tolist(), ranks(v).tolist())):
                    out.writerow([name, neuron, repr(value), r])
        return path


def _make_parent(path):
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _write_text(path, text):
    _make_parent(path)
    with open(path, "w") as f:
        f.write(text)


def _as_list(reports, labels):
    if isinstance(reports, SensitivityReport):
        reports = [reports]
    reports = list(reports)
    if not reports or not all(isinstance(r, SensitivityReport) for r in reports):
        raise TypeError("expected a SensitivityReport or a non-empty list of them")
    if labels is None:
        labels = [r.meta.get("label") or r.meta.get("model") or f"model {i}" for i, r in enumerate(reports)]
        if len(set(labels)) < len(labels):
            labels = [f"{label} ({i})" for i, label in enumerate(labels)]
    labels = list(labels)
    if len(labels) != len(reports):
        raise ValueError(f"got {len(reports)} reports but {len(labels)} labels")
    if len(set(labels)) < len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    return reports, labels


def _union_layers(reports):
    layers = []
    for r in reports:
        layers += [name for name in r.layers if name not in layers]
    return layers


class Comparison:
    """Per-layer mean sensitivity of several models and each one's ratio to the first (the baseline)."""

    def __init__(self, labels, layers, means):
        self.labels = labels
        self.layers = layers
        self.means = means  # means[label][layer] -> float, NaN where a model lacks the layer

    def ratio(self, label, layer):
        base = self.means[self.labels[0]][layer]
        value = self.means[label][layer]
        return value / base if base > 0 else math.nan

    def rows(self):
        """One dict per layer, plus a final ``all layers`` row averaging the layer means."""
        out = []
        for layer in self.layers + ["all layers"]:
            row = {"layer": layer}
            for label in self.labels:
                row[label] = self.means[label][layer]
            for label in self.labels[1:]:
                row[f"{label} / {self.labels[0]}"] = self.ratio(label, layer)
            out.append(row)
        return out

    def to_markdown(self):
        rows = self.rows()
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for row in rows:
            cells = [row["layer"]] + [_fmt(row[h], ratio=" / " in h) for h in header[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self, path):
        rows = self.rows()
        _make_parent(path)
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
        return path

    def __str__(self):
        return self.to_markdown()


def _fmt(value, ratio=False):
    if math.isnan(value):
        return "-"
    return f"{value:.2f}x" if ratio else f"{value:.4g}"


def compare(reports, labels=None):
    """A :class:`Comparison` of per-layer mean sensitivities; ratios are to the first report.

    Reports must share the metric. Layers missing from a report show as NaN (``-`` in markdown).
    """
    reports, labels = _as_list(reports, labels)
    metrics = {r.meta.get("metric") for r in reports}
    if len(metrics) > 1:
        raise ValueError(f"compare: the reports use different metrics ({', '.join(map(str, sorted(metrics, key=str)))})")
    layers = _union_layers(reports)
    means = {}
    for label, report in zip(labels, reports):
        per_layer = report.layer_means()
        means[label] = {layer: per_layer.get(layer, math.nan) for layer in layers}
        present = [v for v in means[label].values() if not math.isnan(v)]
        means[label]["all layers"] = sum(present) / len(present)
    return Comparison(labels, layers, means)


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path):
    if path is not None:
        _make_parent(path)
        fig.savefig(path)
    return fig


def _metric_label(reports):
    metric = reports[0].meta.get("metric", "l1")
    relative = " (relative)" if reports[0].meta.get("relative") else ""
    return f"sensitivity, {metric}{relative}"


def plot_layer_means(reports, labels=None, path=None, log=None, title="Mean neuron sensitivity per layer"):
    """Per-layer mean sensitivity, one line per model, layers in network order. Returns the Figure.

    ``log=None`` picks a log axis when the values span more than 20x, so that robust models do not
    flatten against a standard one."""
    reports, labels = _as_list(reports, labels)
    layers = _union_layers(reports)
    if log is None:
        values = [v for r in reports for v in r.layer_means().values() if v > 0]
        log = bool(values) and max(values) > 20 * min(values)
    fig = _figure(max(6.0, 0.32 * len(layers) + 2.5), 4.2)
    ax = fig.subplots()
    for label, report in zip(labels, reports):
        means = report.layer_means()
        ax.plot(range(len(layers)), [means.get(name, math.nan) for name in layers], marker="o", ms=4, label=label)
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
    available = _union_layers(reports)
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
    """Per-layer histograms of neuron sensitivity (one panel per layer, models overlaid)."""
    reports, labels = _as_list(reports, labels)
    layers = _pick_layers(reports, layers)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(3.0 * cols + 0.5, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        present = [(label, r[layer]) for label, r in zip(labels, reports) if layer in r]
        lo = min(v.min().item() for _, v in present)
        hi = max(v.max().item() for _, v in present)
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1).tolist()
        for label, v in present:
            ax.hist(v.numpy(), bins=edges, alpha=0.6 if len(present) > 1 else 0.9, label=label)
        ax.set_title(f"{layer} ({present[0][1].numel()} neurons)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=4)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    fig.supxlabel(_metric_label(reports), fontsize=9)
    fig.supylabel("neurons", fontsize=9)
    if len(reports) > 1:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_sorted(reports, labels=None, layers=None, path=None, log=True):
    """Sorted sensitivity curves: each layer's neurons from most to least sensitive, against their
    rank as a fraction of the layer, so layers of any width share the axis; one panel per model."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    reports, labels = _as_list(reports, labels)
    layers = _pick_layers(reports, layers, most=len(_union_layers(reports)))
    fig = _figure(4.6 * len(reports) + 1.2, 4.0)
    axes = fig.subplots(1, len(reports), squeeze=False, sharey=True).ravel()
    cmap = colormaps["viridis"]
    for ax, label, report in zip(axes, labels, reports):
        for i, layer in enumerate(layers):
            if layer not in report:
                continue
            v = torch.sort(report[layer], descending=True).values
            x = (torch.arange(v.numel(), dtype=torch.float64) + 0.5) / v.numel()
            ax.plot(x.numpy(), v.numpy(), color=cmap(i / max(1, len(layers) - 1)), lw=1.2, label=layer)
        ax.set_title(label)
        ax.set_xlabel("neuron rank (fraction of layer)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].set_ylabel(_metric_label(reports))
    if len(layers) <= 12:
        axes[-1].legend(fontsize=7)
    else:
        bar = fig.colorbar(ScalarMappable(Normalize(0, len(layers) - 1), cmap), ax=axes.tolist(), pad=0.01)
        bar.set_label("layer depth (first to last)")
    return _save(fig, path)


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
