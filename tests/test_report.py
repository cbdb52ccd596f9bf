import csv
import json
import math

import pytest
import torch

from neurosens.plots import plot_histograms, plot_layer_means, plot_sorted, save_plots
from neurosens.report import Comparison, SensitivityReport, compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(scale=1.0, seed=0, metric="l1", layers=(("conv1", 16), ("layer1.0.conv1", 32), ("fc", 10))):
    g = torch.Generator().manual_seed(seed)
    values = {name: scale * (i + 1) * torch.rand(c, generator=g, dtype=torch.float64) for i, (name, c) in enumerate(layers)}
    return SensitivityReport(values, {"metric": metric, "samples": 100, "model": "Net", "attack": "PGD"})


def test_topk_and_bottomk_against_a_sort():
    report = make_report()
    v = report["layer1.0.conv1"]
    top = report.topk("layer1.0.conv1", 5)
    order = sorted(range(32), key=lambda i: -v[i].item())[:5]
    assert top.indices.tolist() == order
    torch.testing.assert_close(top.values, v[order], rtol=0, atol=0)
    low = report.bottomk("layer1.0.conv1", 0.25)
    assert low.indices.tolist() == sorted(range(32), key=lambda i: v[i].item())[:8]
    assert report.topk("conv1").indices.numel() == 2  # default: 10% of 16 neurons, rounded
    assert report.topk("fc", 1.0).indices.numel() == 10


def test_ties_break_by_lower_index():
    report = SensitivityReport({"a": torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])})
    assert report.topk("a", 3).indices.tolist() == [1, 2, 4]
    assert report.bottomk("a", 2).indices.tolist() == [3, 0]


def test_ranking_errors():
    report = make_report()
    with pytest.raises(KeyError, match=r"no layer 'conv9'; it has conv1, layer1.0.conv1, fc"):
        report.topk("conv9", 3)
    with pytest.raises(ValueError, match=r"topk\('fc'\): k=11 is out of range: the layer has 10 neurons"):
        report.topk("fc", 11)
    with pytest.raises(ValueError, match=r"k=1.5 as a fraction must be in \(0, 1\]"):
        report.bottomk("fc", 1.5)
    with pytest.raises(ValueError, match=r"layer 'x' needs a non-empty 1-D tensor"):
        SensitivityReport({"x": torch.zeros(2, 2)})


def test_layer_means_and_table():
    report = make_report()
    means = report.layer_means()
    assert list(means) == report.layers
    for name, v in report.sensitivity.items():
        assert means[name] == pytest.approx(v.mean().item(), rel=1e-15)
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(report) and lines[2].startswith("| conv1 | 16 |")


def test_json_round_trip_is_exact(tmp_path):
    report = make_report()
    path = tmp_path / "sub" / "report.json"
    text = report.to_json(path)
    for loaded in (SensitivityReport.from_json(path), SensitivityReport.from_json(str(path)), SensitivityReport.loads(text)):
        assert loaded.layers == report.layers and loaded.meta == report.meta
        for name in report.layers:
            assert torch.equal(loaded[name], report[name])
    data = json.loads(text)
    data["format"] = "something/else"
    with pytest.raises(ValueError, match=r"expected format 'neurosens.sensitivity/1'"):
        SensitivityReport.from_dict(data)


def test_csv_has_one_row_per_neuron_with_ranks(tmp_path):
    report = make_report()
    report.to_csv(tmp_path / "n.csv")
    with open(tmp_path / "n.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 + 32 + 10
    fc = [r for r in rows if r["layer"] == "fc"]
    values = report["fc"]
    for r in fc:
        assert float(r["sensitivity"]) == values[int(r["neuron"])].item()
    best = min(fc, key=lambda r: int(r["rank"]))
    assert int(best["neuron"]) == report.topk("fc", 1).indices.item()
    assert sorted(int(r["rank"]) for r in fc) == list(range(1, 11))


def test_compare_means_and_ratios(tmp_path):
    base = make_report()
    robust = make_report(scale=0.5)
    other = SensitivityReport({"conv1": torch.ones(4, dtype=torch.float64)}, {"metric": "l1"})
    table = compare([base, robust, other], ["standard", "robust", "small"])
    assert isinstance(table, Comparison)
    rows = {row["layer"]: row for row in table.rows()}
    assert list(rows) == ["conv1", "layer1.0.conv1", "fc", "shared layers (1 of 3)"]
    assert rows["fc"]["robust / standard"] == pytest.approx(0.5)
    assert rows["conv1"]["small"] == 1.0 and math.isnan(rows["fc"]["small"])
    # Only conv1 is in every report, so the summary of each model averages conv1 alone.
    assert rows["shared layers (1 of 3)"]["standard"] == pytest.approx(base.layer_means()["conv1"])
    assert rows["shared layers (1 of 3)"]["small"] == 1.0
    full = {row["layer"]: row for row in compare([base, robust], ["standard", "robust"]).rows()}
    assert full["all layers"]["standard"] == pytest.approx(sum(base.layer_means().values()) / 3)
    text = table.to_markdown()
    assert "| fc |" in text and "0.5x" in text and "| - |" in text
    table.to_csv(tmp_path / "cmp.csv")
    with open(tmp_path / "cmp.csv") as f:
        assert next(csv.reader(f)) == ["layer", "standard", "robust", "small", "robust / standard", "small / standard"]


def test_compare_shows_the_standard_error_of_each_layer_mean_where_a_report_has_it():
    plain = SensitivityReport({"a": torch.full((4,), 0.5, dtype=torch.float64)}, {"metric": "l1"})
    measured = SensitivityReport({"a": torch.full((4,), 0.25, dtype=torch.float64)}, {"metric": "l1"},
                                 stderr={"a": torch.full((4,), 0.01, dtype=torch.float64)}, layer_stderr={"a": 0.0031},
                                 halves={"a": torch.full((2, 4), 0.25, dtype=torch.float64)})
    header, rows = compare([plain, measured], ["plain", "measured"]).text_rows()
    cells = dict(zip(header, rows[0]))
    assert cells["plain"] == "0.5" and cells["measured"] == "0.25 ± 0.0031" and cells["measured / plain"] == "0.5x"
    assert "±" not in " ".join(rows[1])  # the mean over layers has no standard error of its own


def test_compare_errors_and_default_labels():
    a, b = make_report(), make_report(metric="cosine")
    with pytest.raises(ValueError, match=r"compare: the reports measure different distances \(l1, cosine\)"):
        compare([a, b])
    relative = SensitivityReport(a.sensitivity, {**a.meta, "relative": True})
    with pytest.raises(ValueError, match=r"different distances \(l1, l1 \(relative\)\)"):
        compare([a, a, relative])
    with pytest.raises(ValueError, match=r"got 2 reports but 1 labels"):
        compare([a, a], ["x"])
    assert compare([a, a]).labels == ["Net (0)", "Net (1)"]


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    return data


@pytest.mark.slow
def test_plots_write_pngs(tmp_path):
    base, robust = make_report(), make_report(scale=0.5, seed=1)
    fig = plot_layer_means([base, robust], ["standard", "robust"], path=tmp_path / "means.png", log=True)
    assert [len(ax.lines) for ax in fig.axes] == [2]
    _png(tmp_path / "means.png")
    fig = plot_histograms(base, path=tmp_path / "hist.png")
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    _png(tmp_path / "hist.png")
    fig = plot_sorted([base, robust], path=tmp_path / "sorted.png")
    assert [len(ax.lines) for ax in fig.axes[:2]] == [3, 3]
    _png(tmp_path / "sorted.png")
    paths = save_plots(base, tmp_path / "all", prefix="net_")
    for path in paths.values():
        assert path.endswith(".png")
        _png(type(tmp_path)(path))


def test_plots_pick_layers_of_wide_models(tmp_path):
    many = SensitivityReport({f"l{i}": torch.rand(8, dtype=torch.float64) + i for i in range(30)}, {"metric": "l1"})
    fig = plot_histograms(many)
    assert sum(ax.get_visible() for ax in fig.axes) == 12
    fig = plot_sorted(many, path=tmp_path / "s.png")
    assert len(fig.axes[0].lines) == 30
    with pytest.raises(KeyError, match=r"no layer 'zz'"):
        plot_histograms(many, layers=["l0", "zz"])


def test_layer_means_axis_turns_log_when_values_span_decades():
    base = make_report()
    close = plot_layer_means([base, make_report(scale=0.5, seed=1)])
    assert close.axes[0].get_yscale() == "linear"
    spread = plot_layer_means([base, make_report(scale=0.01, seed=1)])
    assert spread.axes[0].get_yscale() == "log"
    assert plot_layer_means([base, make_report(scale=0.01, seed=1)], log=False).axes[0].get_yscale() == "linear"
