"""Sensitivity reports: rankings, per-layer means, their uncertainty, JSON/CSV files and comparisons
(plots: :mod:`neurosens.plots`)."""
import csv
import json
import math
import os
from statistics import NormalDist
from typing import NamedTuple

import torch

from .selection import ranks, resolve_k, topk

FORMAT = "neurosens.sensitivity/1"

#: z of a two-sided 95% normal interval: mean +- Z95 * standard error.
Z95 = NormalDist().inv_cdf(0.975)


class TopKInterval(NamedTuple):
    """Top-k neurons with the normal interval of each one's mean sensitivity: ``low`` and ``high``
    are ``values -+ z * stderr``."""

    values: torch.Tensor
    indices: torch.Tensor
    stderr: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


class SensitivityReport:
    """Per-layer, per-neuron sensitivity (``report[layer]`` is a float64 [C] tensor) plus metadata.

    ``meta`` holds what produced it: ``metric``, ``relative``, ``samples``, ``model``, ``attack``,
    per-layer output ``shape`` under ``layers``, and anything the caller adds.

    The uncertainty of the means, which :class:`~neurosens.sensitivity.NeuronSensitivity` records
    and reports saved before it did lack (each is then None, and what needs it says so):
    ``stderr`` (``{layer: [C]}``, each neuron's standard error of the mean: sample standard
    deviation over the samples / sqrt(samples)), ``layer_stderr`` (``{layer: float}``, the standard
    error of the layer's mean over its neurons, from each sample's mean over the neurons) and
    ``halves`` (``{layer: [2, C]}``, the mean sensitivities over the samples at even and at odd
    positions of the measured stream, for :meth:`split_half_overlap`).
    """

    def __init__(self, sensitivity, meta=None, stderr=None, layer_stderr=None, halves=None):
        if not sensitivity:
            raise ValueError("SensitivityReport: no layers")
        self.sensitivity = {}
        for name, values in sensitivity.items():
            values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(f"SensitivityReport: layer {name!r} needs a non-empty 1-D tensor of neurons, got shape {list(values.shape)}")
            self.sensitivity[name] = values
        self.meta = dict(meta or {})
        self.stderr = self._per_layer(stderr, "stderr", lambda c: [c])
        self.layer_stderr = self._per_layer(layer_stderr, "layer_stderr", lambda c: [])
        self.halves = self._per_layer(halves, "halves", lambda c: [2, c])

    def _per_layer(self, given, field, shape_of):
        """``given`` as ``{layer: float64 tensor}`` (a float for 0-d shapes) of the shape ``shape_of(neurons)``,
        with exactly the report's layers; None stays None."""
        if given is None:
            return None
        if not isinstance(given, dict) or list(given) != self.layers:
            got = list(given) if isinstance(given, dict) else type(given).__name__
            raise ValueError(f"SensitivityReport: {field} must give the report's layers {self.layers} in order, got {got}")
        out = {}
        for name, values in given.items():
            shape = shape_of(self.sensitivity[name].numel())
            try:
                values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"SensitivityReport: {field}[{name!r}] is not numbers of shape {shape} ({err})") from None
            if list(values.shape) != shape:
                raise ValueError(f"SensitivityReport: {field}[{name!r}] has shape {list(values.shape)}, expected {shape}")
            out[name] = values.item() if not shape else values
        return out

    def _require(self, field, where):
        """The uncertainty ``field``, or one error saying that this report does not carry it."""
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{where}: this report has no {field} (saved without it, by an earlier neurosens or by "
                             "hand); measure the model again to get it")
        return value

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

    def topk(self, layer, k=0.1, largest=True, intervals=False, z=Z95):
        """The ``k`` (count or fraction; default 10%) most sensitive neurons of ``layer``, most first.

        Ties are broken by the lower neuron index, so rankings are reproducible. Returns
        ``TopK(values, indices)``; with ``intervals=True`` a :class:`TopKInterval` that adds each
        neuron's standard error and the interval ``values -+ z * stderr`` (default z: 95%, 1.96).
        """
        where = f"SensitivityReport.topk({layer!r})"
        values = self[layer]
        if intervals and (isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 < z < math.inf):
            raise ValueError(f"{where}: z={z!r} must be a positive number (1.96 for a 95% interval)")
        chosen = topk(values, resolve_k(k, values.numel(), where), largest)
        if not intervals:
            return chosen
        stderr = self._require("stderr", where)[layer][chosen.indices]
        return TopKInterval(chosen.values, chosen.indices, stderr, chosen.values - z * stderr, chosen.values + z * stderr)

    def bottomk(self, layer, k=0.1):
        """The ``k`` least sensitive neurons of ``layer``, least first."""
        return self.topk(layer, k, largest=False)

    def layer_means(self):
        """``{layer: mean sensitivity over its neurons}`` in layer order."""
        return {name: v.mean().item() for name, v in self.sensitivity.items()}

    def split_half_overlap(self, k=0.1):
        """``{layer: overlap}``: the fraction of the ``k`` (count or fraction, as in :meth:`topk`)
        most sensitive neurons of each layer that both halves of the data (the samples at even and
        at odd positions of the measured stream) rank in their top ``k``. 1 is a ranking the data
        agree on; random rankings give k / neurons on average. NaN for a layer with an empty half
        (fewer than two samples)."""
        halves = self._require("halves", "SensitivityReport.split_half_overlap")
        out = {}
        for name, (first, second) in halves.items():
            count = resolve_k(k, first.numel(), f"SensitivityReport.split_half_overlap, layer {name!r}")
            out[name] = math.nan if first.isnan().all() or second.isnan().all() else _overlap(first, second, count)
        return out

    def table(self, k=0.1):
        """A markdown table of each layer's neurons, mean, median and max sensitivity; a report
        that carries its uncertainty adds the standard error of the layer mean, each neuron's median
        standard error and the split-half overlap of the top ``k`` (see :meth:`split_half_overlap`)."""
        header = ["layer", "neurons", "mean", "median", "max"]
        uncertain = self.stderr is not None and self.layer_stderr is not None and self.halves is not None
        if uncertain:
            overlaps = self.split_half_overlap(k)
            header += ["stderr of mean", "median neuron stderr", f"split-half top-{_k_label(k)} overlap"]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for name, v in self.sensitivity.items():
            cells = [name, str(v.numel()), f"{v.mean().item():.4g}", f"{v.median().item():.4g}", f"{v.max().item():.4g}"]
            if uncertain:
                cells += [f"{self.layer_stderr[name]:.2g}", f"{self.stderr[name].median().item():.2g}",
                          f"{overlaps[name]:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self):
        """The report as plain data; NaN and infinities are the strings "NaN", "Infinity" and
        "-Infinity", so that the JSON is strict. ``stderr``, ``layer_stderr`` and ``halves`` are
        written when the report has them."""
        data = {
            "format": FORMAT,
            "meta": _encode(self.meta),
            "sensitivity": {name: _encode(v.tolist()) for name, v in self.sensitivity.items()},
        }
        for field in UNCERTAINTY:
            value = getattr(self, field)
            if value is not None:
                data[field] = {name: _encode(v if isinstance(v, float) else v.tolist()) for name, v in value.items()}
        return data

    @classmethod
    def from_dict(cls, data, where="SensitivityReport"):
        """The report that :meth:`to_dict` gave; every field is checked and the one at fault named
        (``where`` says whose: a file's path)."""
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
        sensitivity = {name: _numbers(values, f"{where}: sensitivity[{name!r}]") for name, values in layers.items()}
        extra = {}
        for field in UNCERTAINTY:
            if data.get(field) is None:
                continue  # files written before the uncertainty was recorded
            value = data[field]
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {field!r} must be an object of layer -> numbers, got {type(value).__name__}")
            extra[field] = {name: _numbers(v, f"{where}: {field}[{name!r}]", UNCERTAINTY[field]) for name, v in value.items()}
        return cls(sensitivity, _decode(meta), **extra)

    def to_json(self, path=None):
        """The report as strict JSON text (floats round-trip exactly); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            _write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path):
        """Load a report from the JSON file at ``path`` (:meth:`loads` reads JSON text)."""
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a JSON report (not even text)") from None
        return cls.loads(text, str(path))

    @classmethod
    def loads(cls, text, source="SensitivityReport"):
        """Load a report from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not JSON ({err})") from None
        return cls.from_dict(data, source)

    def to_csv(self, path):
        """One row per neuron: layer, neuron, sensitivity, rank (1 = most sensitive in its layer),
        and its standard error when the report has them."""
        ensure_parent(path)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "neuron", "sensitivity", "rank"] + (["stderr"] if self.stderr is not None else []))
            for name, v in self.sensitivity.items():
                stderr = [[repr(e)] for e in self.stderr[name].tolist()] if self.stderr is not None else [[]] * v.numel()
                for neuron, (value, r, e) in enumerate(zip(v.tolist(), ranks(v).tolist(), stderr)):
                    out.writerow([name, neuron, repr(value), r] + e)
        return path


#: The optional uncertainty fields of a report, in the order files hold them, and how deep their
#: per-layer lists nest.
UNCERTAINTY = {"stderr": 1, "layer_stderr": 0, "halves": 2}


def _k_label(k):
    """``k`` as a column heading: ``10%`` for a fraction, ``5`` for a count."""
    return f"{100 * k:g}%" if isinstance(k, float) else str(k)


def distance_name(metric, relative=False):
    """How reports name a distance: the metric, with " (relative)" for relative ones."""
    return f"{metric}{' (relative)' if relative else ''}"


def _distance_of(report):
    return distance_name(report.meta.get("metric"), report.meta.get("relative"))


def _check_same_distance(reports, where):
    """Sensitivities are comparable only when measured with the same metric, both absolute or both relative."""
    kinds = list(dict.fromkeys(_distance_of(r) for r in reports))
    if len(kinds) > 1:
        raise ValueError(f"{where}: the reports measure different distances ({', '.join(kinds)}); "
                         "compare reports of one metric, all absolute or all relative")


def _overlap(first, second, k):
    """The fraction of the top ``k`` of ``first`` that is also in the top ``k`` of ``second``."""
    shared = set(topk(first, k).indices.tolist()) & set(topk(second, k).indices.tolist())
    return len(shared) / k


def topk_overlap(report_a, report_b, k=0.1):
    """``{layer: overlap}``: the fraction of each layer's ``k`` (count or fraction, as in
    :meth:`SensitivityReport.topk`) most sensitive neurons that two reports share, e.g. two
    measurements of one model under attacks with different seeds. The reports must have the same
    metric (both absolute or both relative), layers and neurons. 1 is the same top-k set; random rankings give k / neurons on average."""
    where = "topk_overlap"
    if not isinstance(report_a, SensitivityReport) or not isinstance(report_b, SensitivityReport):
        raise TypeError(f"{where}: expected two SensitivityReports, got {type(report_a).__name__} and {type(report_b).__name__}")
    _check_same_distance((report_a, report_b), where)
    if report_a.layers != report_b.layers:
        only_a = [n for n in report_a.layers if n not in report_b]
        only_b = [n for n in report_b.layers if n not in report_a]
        raise ValueError(f"{where}: the reports have different layers (only in the first: {only_a or 'none'}; "
                         f"only in the second: {only_b or 'none'}; or another order)")
    out = {}
    for name in report_a.layers:
        a, b = report_a[name], report_b[name]
        if a.numel() != b.numel():
            raise ValueError(f"{where}: layer {name!r} has {a.numel()} neurons in the first report and {b.numel()} in the second")
        out[name] = _overlap(a, b, resolve_k(k, a.numel(), f"{where}, layer {name!r}"))
    return out


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


def _numbers(values, field, depth=1):
    """Sensitivities read from JSON: lists nested ``depth`` deep (0: one number), each number
    checked by :func:`_number`."""
    if depth == 0:
        return _number(values, field)
    if not isinstance(values, list):
        raise ValueError(f"{field} must be a list of {'numbers' if depth == 1 else 'lists'}, got {type(values).__name__}")
    return [_numbers(v, f"{field}[{i}]", depth - 1) for i, v in enumerate(values)]


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

    def __init__(self, labels, layers, means, shared_layers, stderr=None):
        self.labels = labels
        self.layers = layers
        self.means = means  # means[label][layer] -> float, NaN where a model lacks the layer
        self.shared_layers = shared_layers  # the layers every report has (their means may still be NaN)
        # stderr[label][layer] -> the standard error of that mean, NaN where the report has none
        self.stderr = stderr or {label: {} for label in labels}

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
        ``mean ± standard error`` where the report has it, ratios as ``0.0047x``."""
        rows = self.rows()
        header = list(rows[0])

        def cell(row, h):
            text = _cell(row[h], ratio=" / " in h)
            se = self.stderr.get(h, {}).get(row["layer"], math.nan)
            return text if math.isnan(se) or text == "-" else f"{text} ± {se:.2g}"

        return header, [[row["layer"]] + [cell(row, h) for h in header[1:]] for row in rows]

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

    Reports must share the metric and whether it is relative. Layers missing from a report show as NaN (``-`` in markdown);
    the final row averages only the layers all reports have.
    """
    reports, labels = as_reports(reports, labels)
    _check_same_distance(reports, "compare")
    layers = union_layers(reports)
    means, stderr = {}, {}
    for label, report in zip(labels, reports):
        per_layer = report.layer_means()
        means[label] = {layer: per_layer.get(layer, math.nan) for layer in layers}
        stderr[label] = {layer: float(se) for layer, se in (report.layer_stderr or {}).items()}
    shared = [layer for layer in layers if all(layer in r.layers for r in reports)]
    table = Comparison(labels, layers, means, shared, stderr)
    if not shared:
        raise ValueError(f"compare: the reports have no layer in common ({', '.join(labels)})")
    for label in labels:
        means[label][table.summary_row] = sum(means[label][layer] for layer in shared) / len(shared)
    return table
