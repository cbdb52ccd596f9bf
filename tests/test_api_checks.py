"""Integers given as numpy or 0-d tensor values are taken where ints are; bools are not; reports
read from JSON are checked field by field and written as strict JSON."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import neurosens as ns
from neurosens import NeuronSensitivity, SensitivityReport, SNSRegularizer, compare, ops
from neurosens.reference import neuron_distance as reference_distance
from neurosens.selection import resolve_k


@pytest.mark.parametrize("k", [np.int64(2), np.int32(2), torch.tensor(2)])
def test_integer_like_k_is_a_count(k):
    assert resolve_k(k, 5) == 2 and type(resolve_k(k, 5)) is int
    model = nn.Sequential(nn.Linear(4, 5))
    reg = SNSRegularizer(model, layers=["0"], k=k)
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    with reg.capture():
        model(x), model(x + 1)
    reg.loss()
    assert reg.selections["0"].numel() == 2


def test_float_like_k_is_a_fraction():
    assert resolve_k(np.float64(0.5), 6) == 3


@pytest.mark.parametrize("dim", [np.int64(1), torch.tensor(1), np.int64(-1)])
def test_integer_like_channel_dim(dim):
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ops.neuron_distance(a, b, channel_dim=dim).sum, reference_distance(a, b, channel_dim=1))
    meter = NeuronSensitivity(nn.Sequential(nn.Linear(4, 4)), layers=["0"], channel_dim=dim)
    meter.update(a, b)
    assert meter.compute()["0"].numel() == 4


def test_bools_are_not_ints():
    with pytest.raises(TypeError, match=r"channel_dim=True .*bool"):
        NeuronSensitivity(nn.Sequential(nn.Linear(4, 4)), layers=["0"], channel_dim=True)
    with pytest.raises(TypeError, match=r"channel_dim=True .*bool"):
        ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3), channel_dim=True)
    with pytest.raises(TypeError, match=r"k must be an int count or a float fraction, got True"):
        resolve_k(True, 4)


def report_dict(**changes):
    data = {"format": "neurosens.sensitivity/1", "meta": {"metric": "l1"}, "sensitivity": {"conv1": [0.5, 0.25]}}
    data.update(changes)
    return data


@pytest.mark.parametrize("data, message", [
    (report_dict(meta=[1]), r"'meta' must be an object, got list"),
    (report_dict(sensitivity=[1.0]), r"'sensitivity' must be an object of layer -> list of numbers, got list"),
    (report_dict(sensitivity={"conv1": "0.5"}), r"sensitivity\['conv1'\] must be a list of numbers, got str"),
    (report_dict(sensitivity={"conv1": [0.5, "x"]}), r"sensitivity\['conv1'\]\[1\] must be a number, got str"),
    (report_dict(sensitivity={"conv1": [0.5, True]}), r"sensitivity\['conv1'\]\[1\] must be a number, got bool"),
    (report_dict(sensitivity={"conv1": [0.5, -0.1]}), r"sensitivity\['conv1'\]\[1\] = -0.1 is negative"),
    (report_dict(sensitivity=None), r"'sensitivity' must be an object"),
])
def test_from_dict_names_the_field_at_fault(data, message):
    with pytest.raises(ValueError, match=message):
        SensitivityReport.from_dict(data)


def test_files_and_text_are_told_apart_by_the_call(tmp_path):
    report = SensitivityReport({"a": [0.5, 0.25]}, {"metric": "l1"})
    path = tmp_path / "{odd name"
    report.to_json(path)
    assert SensitivityReport.from_json(path).layers == ["a"]
    assert SensitivityReport.from_json(str(path)).layers == ["a"]
    assert SensitivityReport.loads(report.to_json()).layers == ["a"]
    with pytest.raises(FileNotFoundError):
        SensitivityReport.from_json(str(tmp_path / "missing.json"))


def test_non_finite_values_round_trip_as_strict_json(tmp_path):
    report = SensitivityReport({"a": [math.nan, math.inf, 0.5]}, {"metric": "l1", "acc": math.nan})
    text = report.to_json(tmp_path / "r.json")

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads(text, parse_constant=refuse)
    back = SensitivityReport.from_json(tmp_path / "r.json")
    assert math.isnan(back["a"][0]) and back["a"][1] == math.inf and back["a"][2] == 0.5
    assert math.isnan(back.meta["acc"])


def test_compare_handles_nan_layer_means():
    nan = SensitivityReport({"a": [math.nan, 1.0]}, {"metric": "l1"})
    fine = SensitivityReport({"a": [0.5, 1.5]}, {"metric": "l1"})
    table = compare([fine, nan], ["fine", "nan"])
    assert table.means["fine"]["all layers"] == 1.0
    assert math.isnan(table.means["nan"]["all layers"])
    assert math.isnan(table.ratio("nan", "a"))


def test_yes_no_options_must_be_bools():
    a, b = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    for call, arg in ((lambda v: ops.neuron_topk(a, b, 2, largest=v), "largest"),
                      (lambda v: ops.neuron_topk(a, b, 2, relative=v), "relative"),
                      (lambda v: ops.neuron_distance(a, b, relative=v), "relative"),
                      (lambda v: ops.neuron_distance_per_sample(a, b, relative=v), "relative"),
                      (lambda v: ops.stabilize(a, b, k=2, return_indices=v), "return_indices")):
        for value in (None, 1.0, "yes"):
            with pytest.raises(TypeError, match=rf"{arg}={value!r} must be True or False"):
                call(value)
    assert torch.equal(ops.neuron_topk(a, b, 2, largest=np.bool_(False)).indices, ops.neuron_topk(a, b, 2, largest=False).indices)


def test_distances_of_batches_add_up_with_plus_and_sum():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, 3, generator=g, dtype=torch.float64), torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    parts = [ops.neuron_distance(a[i:j], b[i:j]) for i, j in ((0, 2), (2, 3), (3, 7))]
    whole = ops.neuron_distance(a, b)
    for total in (parts[0] + parts[1] + parts[2], sum(parts)):
        assert isinstance(total, ops.NeuronDistance) and total.count == 7
        torch.testing.assert_close(total.sum, whole.sum, rtol=1e-12, atol=0)
        torch.testing.assert_close(total.mean(), (a - b).abs().mean(2).mean(0), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"sums over 5 and 4 neurons cannot be added"):
        whole + ops.neuron_distance(a[:, :4], b[:, :4])


@pytest.mark.parametrize("k,neurons,count", [(0.1, 25, 3), (0.1, 35, 4), (0.5, 5, 3), (0.3, 16, 5), (0.1, 64, 6),
                                             (0.01, 10, 1), (np.float32(0.5), 10, 5), (torch.tensor(0.25), 10, 3),
                                             (0.58, 25, 15), (np.float32(0.35), 10, 4), (0.07, 50, 4)])
def test_a_fraction_of_k_rounds_to_the_nearest_count_with_halves_up(k, neurons, count):
    assert resolve_k(k, neurons) == count


def test_raw_ops_given_meta_and_real_tensors_check_their_arguments():
    a, b = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match=r"neurosens.neuron_topk: a and b must be on the same device, got a on cpu and b on meta"):
        torch.ops.neurosens.neuron_topk(a, b.to(meta), 2)
    with pytest.raises(ValueError, match=r"neurosens.neuron_topk: k=100 is out of range: the layer has 6 neurons"):
        torch.ops.neurosens.neuron_topk(a.to(meta), b.to(meta), 100)
    with pytest.raises(ValueError, match=r"neurosens.stabilize: indices must be a 1-D int64 tensor of k=2 entries on cpu"):
        torch.ops.neurosens.stabilize(a, b, torch.tensor([1, 2], device=meta), 2)
    with pytest.raises(ValueError, match=r"neurosens.neuron_distance: unknown metric='l3'"):
        torch.ops.neurosens.neuron_distance(a.to(meta), b.to(meta), "l3")
    values, indices = torch.ops.neurosens.neuron_topk(a.to(meta), b.to(meta), 2, "l1", -1)
    assert values.shape == indices.shape == (2,) and values.device == meta


def test_measure_asks_for_an_attack_object_not_a_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"measure: attack='pgd' must be a callable attack\(x, y\) -> x_adv"):
        ns.measure(model, [(torch.rand(2, 4), torch.zeros(2, dtype=torch.long))], "pgd")
