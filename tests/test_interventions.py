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


SENSITIVITY = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4])
MOST_FIRST = [1, 6, 4, 3, 7, 0, 5, 2]  # the order of SENSITIVITY, largest first


def decisive_net():
    """net()'s shape with no hidden biases and a unit-normal head, so that every hidden unit sways
    the prediction (net() predicts one class whatever its hidden layer does)."""
    model = net()
    with torch.no_grad():
        model[3].bias.zero_()
        model[5].weight.normal_(generator=torch.Generator().manual_seed(1))
        model[5].bias.zero_()
    return model


def hand_accuracies(model, x, x_adv, y, neurons, mode):
    """Benign and adversarial accuracy with neurons of layer "3" (the 8-unit hidden layer) edited by hand."""
    with torch.no_grad():
        benign, adversarial = model[:4](x), model[:4](x_adv)
        neurons = list(neurons)
        if mode == "zero":
            benign[:, neurons] = 0
            adversarial[:, neurons] = 0
        else:
            adversarial[:, neurons] = benign[:, neurons]
        head = model[4:]
        return [(head(h).argmax(1) == y).double().mean().item() for h in (benign, adversarial)]


@pytest.mark.parametrize("mode", ["zero", "repair"])
def test_curves_of_every_selection_match_hand_edits(mode):
    model = decisive_net()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(60, 1, 5, 5, generator=gen)
    x_adv = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    batches = [(x[:25], x_adv[:25], y[:25]), (x[25:], x_adv[25:], y[25:])]
    report = SensitivityReport({"0": torch.rand(6, generator=gen), "3": SENSITIVITY})
    ks = (1, 3, 6)
    expected = {
        "top": [hand_accuracies(model, x, x_adv, y, MOST_FIRST[:k], mode) for k in ks],
        "bottom": [hand_accuracies(model, x, x_adv, y, MOST_FIRST[::-1][:k], mode) for k in ks],
    }
    draws = {k: [hand_accuracies(model, x, x_adv, y, torch.randperm(8, generator=torch.Generator().manual_seed(s))[:k].tolist(), mode)
                 for s in range(3)] for k in ks}
    expected["random"] = [torch.tensor(draws[k], dtype=torch.float64).mean(0).tolist() for k in ks]
    curves = [expected[s] for s in ("top", "bottom", "random")]
    assert all(a != b for i, a in enumerate(curves) for b in curves[i + 1:]), "the selections must give different curves"
    baseline = hand_accuracies(model, x, x_adv, y, [], mode)
    for selection, values in expected.items():
        curve = intervention_curve(model, batches, "3", report, ks=ks, selection=selection, mode=mode, seeds=3, progress=False)
        assert curve["k"] == list(ks)
        assert curve["baseline"] == pytest.approx(tuple(baseline))
        assert curve["benign"] == pytest.approx([v[0] for v in values]), selection
        assert curve["adversarial"] == pytest.approx([v[1] for v in values]), selection
        if selection == "random":
            spread = [torch.tensor(draws[k], dtype=torch.float64).std(0, unbiased=False).tolist() for k in ks]
            assert curve["benign_std"] == pytest.approx([s[0] for s in spread])
            assert curve["adversarial_std"] == pytest.approx([s[1] for s in spread])
