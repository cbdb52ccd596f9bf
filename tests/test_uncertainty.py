"""Standard errors, intervals and ranking stability of sensitivity reports, against hand computations."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import neurosens as ns
from neurosens.report import SensitivityReport, topk_overlap
from neurosens.sensitivity import NeuronSensitivity

from conftest import fresh_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 6 * 6, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


LAYERS = ["conv", "fc1", "fc2"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy machine


def make(n=37, seed=0, device="cpu"):
    torch.manual_seed(seed)
    net = Net().double().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    x_adv = x + 0.2 * torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    return net, x.to(device), x_adv.to(device)


def stream(net, x, x_adv, batch, metric="l1"):
    meter = NeuronSensitivity(net, metric=metric)
    for i in range(0, len(x), batch):
        meter.update(x[i:i + batch], x_adv[i:i + batch])
    return meter.compute()


def distances_by_hand(net, x, x_adv, metric):
    """{layer: numpy [N, C]} per-sample distances from outputs kept by plain hooks on two separate forwards."""
    outs, modules = {}, dict(net.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o.cpu().numpy()))
               for n in LAYERS]
    with torch.no_grad():
        net(x)
        net(x_adv)
    for h in handles:
        h.remove()
    result = {}
    for name, (a, b) in outs.items():
        a, b = a.reshape(a.shape[0], a.shape[1], -1), b.reshape(b.shape[0], b.shape[1], -1)
        if metric == "l1":
            result[name] = np.abs(a - b).mean(-1)
        else:
            cos = (a * b).sum(-1) / np.maximum(np.sqrt((a * a).sum(-1) * (b * b).sum(-1)), 1e-8)
            both_zero = ((a == 0) & (b == 0)).all(-1)
            result[name] = np.where(both_zero, 0.0, 1 - cos)
    return result


def sem(values):
    """Standard error of the mean over axis 0, numpy's way."""
    return values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])


def top_set(values, k):
    """The k largest entries of a numpy vector, ties to the lower index."""
    return set(np.argsort(-values, kind="stable")[:k].tolist())


def as_np(t):
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("metric", ["l1", "cosine"])
def test_standard_errors_and_halves_match_distances_kept_by_hand(metric, device):
    net, x, x_adv = make(device=device)
    report = stream(net, x, x_adv, batch=5, metric=metric)  # 37 samples in uneven batches: halves of 19 and 18
    by_hand = distances_by_hand(net, x, x_adv, metric)
    for name in LAYERS:
        d = by_hand[name]
        np.testing.assert_allclose(as_np(report[name]), d.mean(0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(as_np(report.stderr[name]), sem(d), rtol=1e-8, atol=1e-14)
        assert report.layer_stderr[name] == pytest.approx(sem(d.mean(1)), rel=1e-8)
        np.testing.assert_allclose(as_np(report.halves[name]), np.stack([d[0::2].mean(0), d[1::2].mean(0)]), rtol=1e-10,
                                   atol=1e-14)
        assert report.meta["layers"][name]["half_samples"] == [19, 18]


def test_batch_size_changes_nothing():
    net, x, x_adv = make()
    one, many = stream(net, x, x_adv, batch=37), stream(net, x, x_adv, batch=4)
    for name in LAYERS:
        torch.testing.assert_close(many.stderr[name], one.stderr[name], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(many.halves[name], one.halves[name], rtol=1e-12, atol=1e-15)
    assert many.split_half_overlap(2) == one.split_half_overlap(2)


def test_one_sample_leaves_the_spread_undefined():
    net, x, x_adv = make(n=1)
    report = stream(net, x, x_adv, batch=1)
    assert all(report.stderr[name].isnan().all() for name in LAYERS)
    assert all(math.isnan(report.layer_stderr[name]) for name in LAYERS)
    assert all(math.isnan(v) for v in report.split_half_overlap().values())
    assert "| nan | nan | nan |" in report.table()


def test_intervals_are_mean_plus_minus_z_stderr():
    net, x, x_adv = make()
    report = stream(net, x, x_adv, batch=8)
    plain = report.topk("fc1", 3)
    for z, kwargs in ((1.959963984540054, {}), (1.0, {"z": 1.0})):
        got = report.topk("fc1", 3, intervals=True, **kwargs)
        assert torch.equal(got.values, plain.values) and torch.equal(got.indices, plain.indices)
        stderr = sem(distances_by_hand(net, x, x_adv, "l1")["fc1"])[plain.indices.numpy()]
        np.testing.assert_allclose(got.stderr.numpy(), stderr, rtol=1e-8)
        np.testing.assert_allclose(got.low.numpy(), plain.values.numpy() - z * stderr, rtol=1e-8)
        np.testing.assert_allclose(got.high.numpy(), plain.values.numpy() + z * stderr, rtol=1e-8)
    least = report.topk("fc1", 2, largest=False, intervals=True)
    assert torch.equal(least.indices, report.bottomk("fc1", 2).indices)
    for bad in (0, -1.0, math.inf, "2", True):
        with pytest.raises(ValueError, match=rf"topk\('fc1'\): z={bad!r} must be a positive number"):
            report.topk("fc1", 3, intervals=True, z=bad)


def test_split_half_overlap_against_a_hand_computation():
    net, x, x_adv = make(n=40)
    report = stream(net, x, x_adv, batch=6)
    by_hand = distances_by_hand(net, x, x_adv, "l1")
    for k in (0.3, 2, 1.0):
        got = report.split_half_overlap(k)
        assert list(got) == LAYERS
        for name in LAYERS:
            d = by_hand[name]
            count = k if isinstance(k, int) else max(1, math.floor(k * d.shape[1] + 0.5))
            expected = len(top_set(d[0::2].mean(0), count) & top_set(d[1::2].mean(0), count)) / count
            assert got[name] == pytest.approx(expected)
    assert set(report.split_half_overlap(1.0).values()) == {1.0}  # every neuron in both halves' top


def test_split_half_overlap_closed_form_and_ties():
    sensitivity = {"a": [1.0] * 6, "b": [1.0] * 4}
    halves = {"a": [[5, 4, 3, 2, 1, 0], [0, 1, 2, 3.5, 4, 5]], "b": [[1, 1, 1, 1], [1, 1, 1, 1]]}
    report = SensitivityReport(sensitivity, {"metric": "l1"}, halves=halves)
    # a: top 3 {0, 1, 2} and {5, 4, 3}; top 4 {0, 1, 2, 3} and {5, 4, 3, 2}. b: all tied, the lower index wins.
    assert report.split_half_overlap(3) == {"a": 0.0, "b": 1.0}
    assert report.split_half_overlap(4) == {"a": 0.5, "b": 1.0}


def test_two_attack_seeds():
    model = fresh_model(0).eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(30, 1, 8, 8, generator=gen), torch.randint(0, 10, (30,), generator=gen)
    loader = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10)]
    reports = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # the random start of PGD
        reports.append(ns.measure(model, loader, ns.PGD(model, 0.1, steps=2), progress=False))
    a, b = reports
    assert not torch.equal(a["fc1"], b["fc1"])
    for k in (0.25, 3):
        got = ns.topk_overlap(a, b, k)
        assert list(got) == a.layers
        for name in a.layers:
            count = k if isinstance(k, int) else max(1, math.floor(k * a[name].numel() + 0.5))  # halves up
            expected = len(top_set(a[name].numpy(), count) & top_set(b[name].numpy(), count)) / count
            assert got[name] == pytest.approx(expected)
    assert set(topk_overlap(a, a).values()) == {1.0}
    flipped = SensitivityReport({"x": torch.arange(10.0)}, {"metric": "l1"})
    rising = SensitivityReport({"x": torch.arange(10.0).flip(0)}, {"metric": "l1"})
    assert topk_overlap(flipped, rising, 5) == {"x": 0.0} and topk_overlap(flipped, rising, 6) == {"x": pytest.approx(2 / 6)}


def test_json_round_trip_keeps_the_uncertainty(tmp_path):
    net, x, x_adv = make(n=9)
    report = stream(net, x, x_adv, batch=4)
    single = stream(*make(n=1), batch=1)  # empty odd half: NaN half means must survive strict JSON
    for r in (report, single):
        text = r.to_json(tmp_path / "r.json")
        json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
        loaded = SensitivityReport.from_json(tmp_path / "r.json")
        assert loaded.meta == r.meta or r is single
        for name in LAYERS:
            assert torch.equal(loaded[name], r[name])
            torch.testing.assert_close(loaded.stderr[name], r.stderr[name], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(loaded.halves[name], r.halves[name], rtol=0, atol=0, equal_nan=True)
            assert loaded.layer_stderr[name] == r.layer_stderr[name] or math.isnan(r.layer_stderr[name])
        assert loaded.table() == r.table()
    report.to_csv(tmp_path / "n.csv")
    header, first = (tmp_path / "n.csv").read_text().splitlines()[:2]
    assert header == "layer,neuron,sensitivity,rank,stderr"
    assert float(first.split(",")[4]) == report.stderr["conv"][0].item()

    data = json.loads(report.to_json())
    data["halves"]["fc2"] = [[0.5, 0.5, 0.5]]
    with pytest.raises(ValueError, match=r"halves\['fc2'\] has shape \[1, 3\], expected \[2, 3\]"):
        SensitivityReport.from_dict(data)
    data = json.loads(report.to_json())
    data["stderr"]["fc2"] = [0.1, -0.2, 0.1]
    with pytest.raises(ValueError, match=r"stderr\['fc2'\]\[1\] = -0.2 is negative"):
        SensitivityReport.from_dict(data)
    data = json.loads(report.to_json())
    del data["stderr"]["fc1"]
    with pytest.raises(ValueError, match=r"stderr must give the report's layers \['conv', 'fc1', 'fc2'\] in order"):
        SensitivityReport.from_dict(data)
    data["stderr"] = [1, 2]
    with pytest.raises(ValueError, match=r"'stderr' must be an object of layer -> numbers, got list"):
        SensitivityReport.from_dict(data)


OLD_FILE = """{
 "format": "neurosens.sensitivity/1",
 "meta": {"model": "SmallCNN", "metric": "l1", "relative": false, "samples": 4, "label": "old",
          "layers": {"conv1": {"shape": [3, 8, 8], "channel_dim": 1, "samples": 4},
                     "fc": {"shape": [4], "channel_dim": 1, "samples": 4}}},
 "sensitivity": {"conv1": [0.5, 0.25, 0.75], "fc": [1.0, 2.0, 0.5, "NaN"]}
}"""


def test_a_file_without_uncertainty_still_loads_and_says_what_is_missing(tmp_path):
    (tmp_path / "old.json").write_text(OLD_FILE)
    old = SensitivityReport.from_json(tmp_path / "old.json")
    assert old.stderr is None and old.layer_stderr is None and old.halves is None
    assert old.topk("conv1", 2).indices.tolist() == [2, 0]
    assert old.table().splitlines()[0] == "| layer | neurons | mean | median | max |"
    with pytest.raises(ValueError, match=r"topk\('conv1'\): this report has no stderr .*measure the model again"):
        old.topk("conv1", 2, intervals=True)
    with pytest.raises(ValueError, match=r"split_half_overlap: this report has no halves"):
        old.split_half_overlap()
    assert "stderr" not in old.to_dict() and "halves" not in old.to_dict()
    old.to_csv(tmp_path / "old.csv")
    assert (tmp_path / "old.csv").read_text().splitlines()[0] == "layer,neuron,sensitivity,rank"
    # Plots draw no band for it, and one for a report that has them.
    new = stream(*make(n=6), batch=3)
    assert len(ns.plot_layer_means(old).axes[0].collections) == 0
    fig = ns.plot_layer_means([old, new], ["old", "new"])
    assert len(fig.axes[0].collections) == 1 and "95% interval" in fig.axes[0].get_title()
    # Two layers between them: a band per measured layer in the new report's panel only.
    fig = ns.plot_sorted([old, new], ["old", "new"])
    assert [len(ax.collections) for ax in fig.axes] == [0, len(LAYERS)]
    assert "95% interval" not in fig.axes[0].get_title() and "95% interval" in fig.axes[1].get_title()
    assert len(ns.plot_sorted(new, band=False).axes[0].collections) == 0


def test_bands_are_the_95_percent_intervals():
    report = stream(*make(n=12), batch=5)
    ax = ns.plot_layer_means(report).axes[0]
    band = ax.collections[0].get_paths()[0].vertices
    means = report.layer_means()
    for i, name in enumerate(LAYERS):
        heights = band[np.isclose(band[:, 0], i), 1]
        expected = [means[name] - 1.959964 * report.layer_stderr[name], means[name] + 1.959964 * report.layer_stderr[name]]
        np.testing.assert_allclose([heights.min(), heights.max()], expected, rtol=1e-6)


def test_bad_arguments_are_named():
    net, x, x_adv = make(n=10)
    report = stream(net, x, x_adv, batch=5)
    with pytest.raises(ValueError, match=r"split_half_overlap, layer 'fc2': k=4 is out of range: the layer has 3 neurons"):
        report.split_half_overlap(4)
    with pytest.raises(ValueError, match=r"k=1.5 as a fraction must be in \(0, 1\]"):
        report.split_half_overlap(1.5)
    with pytest.raises(ValueError, match=r"k=0 must be at least 1|k=0 is out of range"):
        report.split_half_overlap(0)
    with pytest.raises(TypeError, match=r"k must be an int count or a float fraction, got '10%'"):
        topk_overlap(report, report, "10%")
    with pytest.raises(ValueError, match=r"topk_overlap, layer 'fc2': k=5 is out of range"):
        topk_overlap(report, report, 5)
    with pytest.raises(TypeError, match=r"topk_overlap: expected two SensitivityReports, got SensitivityReport and dict"):
        topk_overlap(report, {})
    other = SensitivityReport({"conv": report["conv"], "fc9": report["fc2"]}, {"metric": "l1"})
    with pytest.raises(ValueError, match=r"different layers \(only in the first: \['fc1', 'fc2'\]; only in the second: \['fc9'\]"):
        topk_overlap(report, other)
    cosine = SensitivityReport(report.sensitivity, {"metric": "cosine"})
    with pytest.raises(ValueError, match=r"topk_overlap: the reports measure different distances \(l1, cosine\)"):
        topk_overlap(report, cosine)
    relative = SensitivityReport(report.sensitivity, {"metric": "l1", "relative": True})
    with pytest.raises(ValueError, match=r"different distances \(l1, l1 \(relative\)\); compare reports of one metric"):
        topk_overlap(report, relative)
    narrow = SensitivityReport({name: report[name][:2] for name in LAYERS}, {"metric": "l1"})
    with pytest.raises(ValueError, match=r"layer 'conv' has 5 neurons in the first report and 2 in the second"):
        topk_overlap(report, narrow)
    with pytest.raises(ValueError, match=r"stderr\['fc2'\] has shape \[2\], expected \[3\]"):
        SensitivityReport(report.sensitivity, stderr={**report.stderr, "fc2": torch.ones(2)})
    with pytest.raises(ValueError, match=r"halves\['conv'\] is not numbers of shape \[2, 5\]"):
        SensitivityReport(report.sensitivity, halves={name: "x" if name == "conv" else v for name, v in report.halves.items()})


def test_command_prints_stderr_and_split_half(tmp_path, capsys):
    from neurosens.cli import main
    from neurosens.models import build_model

    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 28}
    torch.manual_seed(0)
    torch.save({"model": build_model(**spec).state_dict(), "meta": {"model": spec, "data": "digits"}, "config": {"eps": 0.1}},
               tmp_path / "model.pt")
    out = tmp_path / "out"
    assert main(["sensitivity", str(tmp_path / "model.pt"), "--samples", "12", "--steps", "1", "--layers", "fc1,fc2",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = SensitivityReport.from_json(out / "report.json")
    header = next(i for i, line in enumerate(printed) if line.startswith("layer "))
    assert printed[header].split()[:6] == ["layer", "neurons", "mean", "stderr", "max", "split-half"]
    overlap = report.split_half_overlap()
    for line, name in zip(printed[header + 1:], ["fc1", "fc2"]):
        cells = line.split()
        assert cells[0] == name
        assert float(cells[3]) == pytest.approx(report.layer_stderr[name], rel=0.05)
        assert float(cells[5]) == pytest.approx(overlap[name], abs=0.005)


def _ddp_worker(rank, world, init_file, x, x_adv, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net, _, _ = make()
        meter = NeuronSensitivity(net)
        lo, hi = (0, 14) if rank == 0 else (14, len(x))  # an even first shard: positions stay those of one stream
        for i in range(lo, hi, 5):
            meter.update(x[i:min(i + 5, hi)], x_adv[i:min(i + 5, hi)])
        report = meter.compute()
        torch.save({"stderr": report.stderr, "layer_stderr": report.layer_stderr, "halves": report.halves},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_uncertainty_is_all_reduced(tmp_path):
    net, x, x_adv = make()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, x_adv, str(tmp_path)), nprocs=2, join=True)
    single = stream(net, x, x_adv, batch=37)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in LAYERS:
            torch.testing.assert_close(got["stderr"][name], single.stderr[name], rtol=1e-8, atol=1e-15)
            torch.testing.assert_close(got["halves"][name], single.halves[name], rtol=1e-10, atol=1e-15)
            assert got["layer_stderr"][name] == pytest.approx(single.layer_stderr[name], rel=1e-8)
