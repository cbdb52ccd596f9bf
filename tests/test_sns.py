"""The SNS regularizer against a plain-PyTorch rendering of the same loss."""
import math

import pytest
import torch
from torch import nn

from neurosens import reference
from neurosens.sns import SNSRegularizer


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 6, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(6, 8, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc1", nn.Linear(8 * 36, 12))
    net.add_module("relu3", nn.ReLU())
    net.add_module("fc2", nn.Linear(12, 3))
    return net.to(dtype)


def batch(dtype=torch.float64, n=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=gen, dtype=dtype)
    return x, (x + 0.2 * torch.rand(x.shape, generator=gen, dtype=dtype)).clamp(0, 1)


def reference_loss(net, x, x_adv, layers, k, lam, metric, select_metric):
    acts = {}
    hooks = [dict(net.named_modules())[name].register_forward_hook(
        lambda m, i, o, name=name: acts.setdefault(name, []).append(o)) for name in layers]
    try:
        net(x)
        net(x_adv)
    finally:
        for h in hooks:
            h.remove()
    terms = []
    for name in layers:
        a, b = acts[name]
        C = a.shape[1]
        kk = max(1, math.floor(k * C + 0.5)) if isinstance(k, float) else k
        terms.append(reference.stabilize(a, b, k=kk, metric=metric, select_metric=select_metric)[0])
    return lam * torch.stack(terms).mean()


@pytest.mark.parametrize("metric", ["cosine", "l1", "l2"])
@pytest.mark.parametrize("select_metric", ["l1", "cosine"])
def test_gradient_equals_the_reference(metric, select_metric):
    layers = ["conv1", "conv2", "fc1"]
    net = small_net()
    x, x_adv = batch()
    reg = SNSRegularizer(net, layers=layers, k=0.3, lam=0.7, metric=metric, select_metric=select_metric)
    with reg.capture():
        net(x)
        net(x_adv)
    loss = reg.loss()
    params = list(net.parameters())[:6]  # conv1, conv2, fc1: fc2 lies above every regularized layer
    grads = torch.autograd.grad(loss, params)
    expected = reference_loss(net, x, x_adv, layers, 0.3, 0.7, metric, select_metric)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    # Weights are pulled (biases cancel in a - b for l1 and l2, so only weights are checked).
    assert all(g.abs().sum() > 0 for g in grads[0::2])


def test_one_concatenated_forward_equals_two_forwards():
    net = small_net()
    x, x_adv = batch()
    reg = SNSRegularizer(net, layers=["conv2", "fc1"], k=2)
    with reg.capture():
        net(x)
        net(x_adv)
    two = reg.loss()
    with reg.capture():
        net(torch.cat([x, x_adv]))
    one = reg.loss()
    torch.testing.assert_close(one, two)


@pytest.mark.slow
def test_selection_is_deterministic_and_refreshed_on_schedule():
    def selections(seed, refresh):
        torch.manual_seed(seed)
        net = small_net(torch.float32)
        reg = SNSRegularizer(net, layers=["conv2"], k=3, refresh=refresh)
        picked = []
        for step in range(4):
            x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(seed * 10 + step))
            with reg.capture():
                net(x)
                net((x + 0.3 * torch.rand_like(x)).clamp(0, 1))
            reg.loss().backward()
            picked.append(reg.selections["conv2"].tolist())
        return picked

    assert selections(0, 1) == selections(0, 1)
    kept = selections(0, 2)
    assert kept[0] == kept[1] and kept[2] == kept[3]


def test_lam_scales_the_term_and_zero_gives_zero():
    net = small_net()
    x, x_adv = batch()
    values = []
    for lam in (0.0, 1.0, 2.5):
        reg = SNSRegularizer(net, layers=["conv1"], k=2, lam=lam)
        with reg.capture():
            net(x)
            net(x_adv)
        values.append(reg.loss())
    assert values[0].item() == 0.0
    torch.testing.assert_close(values[2], 2.5 * values[1])


def test_detach_benign_pulls_only_the_adversarial_side():
    net = small_net()
    x, x_adv = batch()
    x.requires_grad_(True)
    x_adv.requires_grad_(True)
    reg = SNSRegularizer(net, layers=["conv2"], k=2, detach_benign=True)
    with reg.capture():
        net(x)
        net(x_adv)
    gx, gadv = torch.autograd.grad(reg.loss(), [x, x_adv], allow_unused=True)
    assert gx is None and gadv.abs().sum() > 0


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"layers": ["conv9"]}, ValueError, "no layer named 'conv9'.*conv1"),
        ({"layers": ["conv1"], "k": 7}, ValueError, r"layer 'conv1'.*k=7 is out of range.*6 neurons"),
        ({"layers": ["fc2"], "k": 1.5}, ValueError, r"k=1.5 as a fraction must be in \(0, 1\]"),
        ({"metric": "kl"}, ValueError, "unknown metric='kl'"),
        ({"select_metric": "max"}, ValueError, "unknown select_metric='max'"),
        ({"lam": -1.0}, ValueError, "lam=-1.0"),
        ({"refresh": 0}, ValueError, "refresh=0"),
        ({"layers": ["conv1"], "k": {"conv2": 2}}, ValueError, "not regularized: conv2"),
    ],
)
def test_bad_options_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        SNSRegularizer(small_net(), **options)


def test_hooks_are_removed_even_when_the_forward_raises():
    net = small_net()
    reg = SNSRegularizer(net, layers=["conv1", "fc1"], k=1)
    with pytest.raises(RuntimeError):
        with reg.capture():
            net(torch.rand(2, 1, 5, 5, dtype=torch.float64))  # wrong size for fc1
    assert all(not m._forward_hooks for m in net.modules())


def test_layer_run_three_times_is_an_error():
    net = small_net()
    reg = SNSRegularizer(net, layers=["conv1"], k=1)
    x, x_adv = batch()
    with reg.capture():
        net(x)
        net(x_adv)
        net(x)
    with pytest.raises(RuntimeError, match="ran 3 times"):
        reg.loss()


def hand_distance(a, b, metric):
    """[N, C] distance of each neuron's map, written out from the definitions (float64)."""
    A = a.double().flatten(2) if a.dim() > 2 else a.double()[..., None]
    B = b.double().flatten(2) if b.dim() > 2 else b.double()[..., None]
    D = A.shape[-1]
    if metric == "l1":
        return (A - B).abs().sum(-1) / D
    if metric == "l2":
        return ((A - B) ** 2).sum(-1).sqrt() / D
    return 1 - (A * B).sum(-1) / (A.pow(2).sum(-1).sqrt() * B.pow(2).sum(-1).sqrt())


def hand_topk(a, b, k, metric="l1"):
    """Indices of the k neurons with the largest mean distance; asserts the k-th is not tied."""
    mean = hand_distance(a.detach(), b.detach(), metric).mean(0)
    order = sorted(range(len(mean)), key=lambda c: -mean[c].item())
    if k < len(mean):
        assert mean[order[k - 1]] - mean[order[k]] > 1e-9, "the test data must not tie at the k-th neuron"
    return torch.tensor(order[:k])


def captured(net, layers, *inputs):
    acts = {name: [] for name in layers}
    modules = dict(net.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts[n].append(o)) for n in layers]
    try:
        for x in inputs:
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return acts


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_term_at_positive_lam_equals_a_hand_written_term(metric):
    """lam * mean over layers of the mean distance over samples and the top-k neurons, from the
    captured activations, with k from a count, a fraction and a per-layer dict."""
    net = small_net()
    x, x_adv = batch(n=7)
    k = {"conv1": 2, "conv2": 0.4, "fc1": 0.25}  # 2 of 6, 3 of 8, 3 of 12
    reg = SNSRegularizer(net, layers=list(k), k=k, lam=1.7, metric=metric)
    with reg.capture():
        net(x)
        net(x_adv)
    loss = reg.loss()
    params = list(net.parameters())[:6]
    grads = torch.autograd.grad(loss, params)

    acts = captured(net, list(k), x, x_adv)
    terms = []
    for name, count in zip(k, (2, 3, 3)):
        a, b = acts[name]
        idx = hand_topk(a, b, count)
        assert sorted(reg.selections[name].tolist()) == sorted(idx.tolist()), name
        terms.append(hand_distance(a, b, metric)[:, idx].mean())
    expected = 1.7 * sum(terms) / len(terms)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e)


def refresh_batches():
    """Four batches whose perturbations (one fixed pattern each) excite different channels."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        x = torch.rand(6, 1, 6, 6, generator=gen, dtype=torch.float64)
        pattern = torch.randn(1, 1, 6, 6, generator=gen, dtype=torch.float64)
        out.append((x, x + 0.5 * pattern))
    return out


@pytest.mark.parametrize("refresh", [1, 2])
def test_selection_is_refreshed_on_schedule_and_kept_in_between(refresh):
    net = small_net()
    reg = SNSRegularizer(net, layers=["conv2"], k=3, lam=1.0, refresh=refresh)
    batches = refresh_batches()
    own = [hand_topk(*captured(net, ["conv2"], x, x_adv)["conv2"], 3) for x, x_adv in batches]
    assert len({tuple(sorted(o.tolist())) for o in own}) == 4, "each batch must pick its own neurons"
    for step, (x, x_adv) in enumerate(batches):
        with reg.capture():
            net(x)
            net(x_adv)
        loss = reg.loss()
        chosen = own[step - step % refresh]
        assert sorted(reg.selections["conv2"].tolist()) == sorted(chosen.tolist()), step
        a, b = captured(net, ["conv2"], x, x_adv)["conv2"]
        torch.testing.assert_close(loss, hand_distance(a, b, "l1")[:, chosen].mean())
