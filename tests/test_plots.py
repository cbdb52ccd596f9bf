"""Figures a reader can read: every layer identifiable, shown layers said, legends off the data."""
import torch

import neurosens as ns
from neurosens.plots import _wrap
from neurosens.report import SensitivityReport

NAMES = [f"features.denseblock{b}.denselayer{i}.conv{c}" for b in (1, 2) for i in range(5) for c in (1, 2)] + ["fc"]


def reports():
    g = torch.Generator().manual_seed(0)
    out = []
    for scale in (1.0, 0.2):
        out.append(SensitivityReport({n: scale * (i + 1) * torch.rand(16, generator=g, dtype=torch.float64)
                                      for i, n in enumerate(NAMES)}, {"metric": "l1"}))
    return out


def test_sorted_plot_names_every_layer_with_its_own_style():
    fig = ns.plot_sorted(reports(), ["standard", "robust"])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == NAMES
    styles = {(line.get_color(), line.get_linestyle()) for line in legend.get_lines()}
    assert len(styles) == len(NAMES) == 21
    # The lines of both panels carry the legend's style for their layer.
    for ax in fig.axes:
        assert [(line.get_label(), line.get_linestyle()) for line in ax.lines] == \
               [(t.get_text(), h.get_linestyle()) for t, h in zip(legend.get_texts(), legend.get_lines())]


def test_histograms_say_which_layers_they_show():
    fig = ns.plot_histograms(reports())
    assert fig._suptitle.get_text() == "12 of 21 layers, spread evenly through the network (layers= picks others)"
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[0] == "features.denseblock1\n.denselayer0.conv1 (16 neurons)" and titles[-1] == "fc (16 neurons)"
    few = ns.plot_histograms(reports(), layers=NAMES[:3])
    assert few._suptitle is None


def test_long_names_wrap_at_dots():
    assert _wrap("conv1") == "conv1"
    lines = _wrap("encoder.layers.encoder_layer_11.mlp.0").split("\n")
    assert lines == ["encoder.layers", ".encoder_layer_11.mlp.0"]
    assert all(len(line) <= 26 for line in lines)


def test_intervention_legend_sits_below_the_axes():
    k = [1, 2, 4]
    curve = {"layer": "conv2", "k": k, "benign": [0.9, 0.8, 0.7], "adversarial": [0.1, 0.2, 0.3], "baseline": (0.95, 0.05)}
    fig = ns.plot_intervention_curves({"zero": {"top": curve}})
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend.get_window_extent().y1 < ax.get_window_extent().y0
    assert "no intervention: benign" in [t.get_text() for t in legend.get_texts()]


def test_compare_keeps_small_ratios_readable():
    base = SensitivityReport({"a": torch.full((4,), 1.0, dtype=torch.float64)}, {"metric": "l1"})
    robust = SensitivityReport({"a": torch.full((4,), 0.0047, dtype=torch.float64)}, {"metric": "l1"})
    text = ns.compare([base, robust], ["standard", "robust"]).to_markdown()
    assert "| a | 1 | 0.0047 | 0.0047x |" in text


def test_histograms_count_every_neuron_and_say_how_many_are_not_finite():
    # The helper's values: float32 edges from these float64 extremes left the smallest one out.
    values = torch.tensor([0.015230000000000001, 0.02, 0.0301, 0.1, 0.0404, 0.5, 0.33333333333333331] * 2 + [0.9, 1e-9],
                          dtype=torch.float64)
    fig = ns.plot_histograms(SensitivityReport({"conv": values}, {"metric": "l1"}))
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 16
    nan = values.clone()
    nan[[3, 5]] = float("nan")
    nan[7] = float("inf")
    fig = ns.plot_histograms(SensitivityReport({"conv": nan}, {"metric": "l1"}))
    assert sum(p.get_height() for p in fig.axes[0].patches) == 13
    assert fig.axes[0].get_title() == "conv (16 neurons, 3 not finite)"
