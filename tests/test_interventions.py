"""Interventions against models edited by hand."""
import copy

import pytest
import torch
from torch import nn

from neurosens.interventions import accuracies, intervene, intervention_curve, mean_benign_output
from neurosens.report import SensitivityReport


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()


def data(n=6):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, 5, 5, generator=gen)
    return x, (x + 0.3 * torch.rand(x.shape, generator=gen)).clamp(0, 1), torch.randint(0, 3, (n,), generator=gen)


def test_zero_equals_removing_the_filters():
    model = net()
    x, x_adv, _ = data()
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited[0].weight[[1, 4]] = 0
        edited[0].bias[[1, 4]] = 0
    both = torch.cat([x, x_adv])
    with torch.no_grad(), intervene(model, "0", [1, 4], "zero"):
        got = model(both)
    torch.testing.assert_close(got, edited(both))


def test_repairing_every_neuron_gives_benign_logits_and_none_changes_nothing():
    model = net()
    x, x_adv, _ = data()
    with torch.no_grad():
        plain = model(torch.cat([x, x_adv]))
        with intervene(model, "3", range(8), "repair"):
            repaired = model(torch.cat([x, x_adv]))
        with intervene(model, "3", [], "repair"):
            untouched = model(torch.cat([x, x_adv]))
    torch.testing.assert_close(repaired[6:], plain[:6])
    torch.testing.assert_close(repaired[:6], plain[:6])
    torch.testing.assert_close(untouched, plain)


def test_mean_mode_uses_the_mean_benign_map():
    model = net()
    x, x_adv, y = data()
    batches = [(x[:3], x_adv[:3], y[:3]), (x[3:], x_adv[3:], y[3:])]
    mean = mean_benign_output(model, batches, "3")
    torch.testing.assert_close(mean, model[:4](x).mean(0))
    with torch.no_grad(), intervene(model, "3", [2], "mean", mean=mean):
        got = model(torch.cat([x, x_adv]))
    hidden = model[:4](torch.cat([x, x_adv]))
    hidden[:, 2] = mean[2]
    torch.testing.assert_close(got, model[5](model[4](hidden)))


def test_curve_counts_and_accuracies():
    model = net()
    x, x_adv, y = data(12)
    batches = [(x, x_adv, y)]
    report = SensitivityReport({"0": torch.arange(6.0), "3": torch.arange(8.0)})
    curve = intervention_curve(model, batches, "3", report, ks=[1, 0.5, 8], selection="top", mode="zero", progress=False)
    assert curve["k"] == [1, 4, 8]
    expected = [accuracies(model, batches, "3", report.topk("3", k).indices, "zero") for k in (1, 4, 8)]
    assert curve["benign"] == [e[0] for e in expected] and curve["adversarial"] == [e[1] for e in expected]
    assert curve["baseline"] == accuracies(model, batches)
    rand = intervention_curve(model, batches, "3", report, ks=[2], selection="random", seeds=4, progress=False)
    assert len(rand["benign_std"]) == 1 and 0.0 <= rand["adversarial"][0] <= 1.0


def test_hooks_are_removed_when_the_forward_raises():
    model = net()
    with pytest.raises(ValueError, match=r"neurons must lie in \[0, 6\)"):
        with intervene(model, "0", [9], "zero"):
            model(torch.rand(2, 1, 5, 5))
    assert not model[0]._forward_hooks


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: intervene(m, "0", [0], "scramble").__enter__(), "mode='scramble'"),
        (lambda m: intervene(m, "0", [0], "mean").__enter__(), "needs the layer's mean"),
        (lambda m: intervene(m, "nope", [0], "zero").__enter__(), "no layer named 'nope'"),
        (lambda m: intervention_curve(m, [], "0", SensitivityReport({"0": torch.ones(6)}), selection="best"), "selection='best'"),
    ],
)
def test_bad_options(call, message):
    with pytest.raises(ValueError, match=message):
        call(net())
