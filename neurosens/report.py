"""Sensitivity reports: rankings, per-layer means, JSON/CSV files and comparisons (plots: :mod:`neurosens.plots`)."""
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
        """The report as plain data; NaN and infinities are the strings "NaN", "Infinity" and
        "-Infinity", so that the JSON is strict."""
        return {
            "format": FORMAT,
            "meta": _encode(self.meta),
            "sensitivity": {name: _encode(v.tolist()) for name, v in self.sensitivity.items()},
        }

    @classmethod
    def from_dict(cls, data):
        """The report that :meth:`to_dict` gave; every field is checked and the one at fault named."""
        where = "SensitivityReport"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a report must be an object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: expected format {FORMAT!r}, got {data.get('format')!r}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
        layers = data.get("sensitivity")
        if not isinstance(layers, dict):
            raise ValueError(f"{where}: 'sensitivity' must be an object of layer -> list of numbers, got {type(layers).__name__}")
        sensitivity = {}
        for name, values in layers.items():
            field = f"sensitivity[{name!r}]"
            if not isinstance(values, list):
                raise ValueError(f"{where}: {field} must be a list of numbers, got {type(values).__name__}")
            sensitivity[name] = [_number(v, f"{where}: {field}[{i}]") for i, v in enumerate(values)]
        return cls(sensitivity, _decode(meta))

    def to_json(self, path=None):
        """The report as strict JSON text (floats round-trip exactly); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            _write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path):
        """Load a report from the JSON file at ``path`` (:meth:`loads` reads JSON text)."""
        with open(path) as f:
            return cls.loads(f.read(), str(path))

    @classmethod
    def loads(cls, text, source="SensitivityReport"):
        """Load a report from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not JSON ({err})") from None
        return cls.from_dict(data)

    def to_csv(self, path):
        """One row per neuron: layer, neuron, sensitivity, rank (1 = most sensitive in its layer)."""
        ensure_parent(path)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "neuron", "sensitivity", "rank"])
            for name, v in self.sensitivity.items():
                for neuron, (value, r) in enumerate(zip(v.tolist(), ranks(v).tolist())):
                    out.writerow([name, neuron, repr(value), r])
        return path


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value):
    """``value`` with NaN and infinities as the strings of :data:`_NON_FINITE`, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    """The inverse of :func:`_encode`."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _number(value, field):
    """A sensitivity read from JSON: a number (or an encoded NaN or +infinity), never negative."""
    if isinstance(value, str) and value in _NON_FINITE:
        value = _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{field} = {value} is negative; sensitivities are distances, >= 0")
    return float(value)


def ensure_parent(path):
    """Create the folder that will hold ``path``."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _write_text(path, text):
    ensure_parent(path)
    with open(path, "w") as f:
        f.write(text)


def as_reports(reports, labels):
    """``reports`` as a list with one unique label each (default: from their metadata)."""
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


def union_layers(reports):
    """Every layer of any of ``reports``, in order of first appearance."""
    layers = []
    for r in reports:
        layers += [name for name in r.layers if name not in layers]
    return layers


class Comparison:
    """Per-layer mean sensitivity of several models and each one's ratio to the first (the baseline)."""

    def __init__(self, labels, layers, means, shared_layers):
        self.labels = labels
        self.layers = layers
        self.means = means  # means[label][layer] -> float, NaN where a model lacks the layer
        self.shared_layers = shared_layers  # the layers every report has (their means may still be NaN)

    def ratio(self, label, layer):
        base = self.means[self.labels[0]][layer]
        value = self.means[label][layer]
        return value / base if base > 0 else math.nan

    @property
    def summary_row(self):
        """Name of the final row, the mean over :attr:`shared_layers`: ``all layers`` when every
        report has the same, else ``shared layers (k of n)``, so no model's mean covers layers
        another's lacks."""
        shared = len(self.shared_layers)
        return "all layers" if shared == len(self.layers) else f"shared layers ({shared} of {len(self.layers)})"

    def rows(self):
        """One dict per layer, plus a final row averaging the layer means (see :attr:`summary_row`)."""
        out = []
        for layer in self.layers + [self.summary_row]:
            row = {"layer": layer}
            for label in self.labels:
                row[label] = self.means[label][layer]
            for label in self.labels[1:]:
                row[f"{label} / {self.labels[0]}"] = self.ratio(label, layer)
            out.append(row)
        return out

    def text_rows(self):
        """``(header, rows of strings)`` as tables print them: ``-`` where a model lacks the layer,
        ratios as ``0.0047x``."""
        rows = self.rows()
        header = list(rows[0])
        return header, [[row["layer"]] + [_cell(row[h], ratio=" / " in h) for h in header[1:]] for row in rows]

    def to_markdown(self):
        header, rows = self.text_rows()
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines)

    def to_csv(self, path):
        rows = self.rows()
        ensure_parent(path)
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
        return path

    def __str__(self):
        return self.to_markdown()


def _cell(value, ratio=False):
    if math.isnan(value):
        return "-"
    return f"{value:.3g}x" if ratio else f"{value:.4g}"


def compare(reports, labels=None):
    """A :class:`Comparison` of per-layer mean sensitivities; ratios are to the first report.

    Reports must share the metric. Layers missing from a report show as NaN (``-`` in markdown);
    the final row averages only the layers all reports have.
    """
    reports, labels = as_reports(reports, labels)
    metrics = {r.meta.get("metric") for r in reports}
    if len(metrics) > 1:
        raise ValueError(f"compare: the reports use different metrics ({', '.join(map(str, sorted(metrics, key=str)))})")
    layers = union_layers(reports)
    means = {}
    for label, report in zip(labels, reports):
        per_layer = report.layer_means()
        means[label] = {layer: per_layer.get(layer, math.nan) for layer in layers}
    shared = [layer for layer in layers if all(layer in r.layers for r in reports)]
    table = Comparison(labels, layers, means, shared)
    if not shared:
        raise ValueError(f"compare: the reports have no layer in common ({', '.join(labels)})")
    for label in labels:
        means[label][table.summary_row] = sum(means[label][layer] for layer in shared) / len(shared)
    return table
