import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurosens import attacks, data
from neurosens.attacks import CW, FGSM, PGD, AutoAttack, make_attack, margin_loss, project
from neurosens.models import build_model

from conftest import trained_on_digits

pytestmark = pytest.mark.usefixtures("one_thread")


HAS_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None


@pytest.fixture(scope="module")
def digits():
    """A small CNN trained on scikit-learn's 8x8 digits (about 6 s on one core), and the test split."""
    return trained_on_digits(lambda: build_model("small-cnn", 10, 1, 8, width=16, hidden=64), 60)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


ALL = [
    lambda m, eps: FGSM(m, eps),
    lambda m, eps: FGSM(m, eps, norm="l2"),
    lambda m, eps: PGD(m, eps, steps=5),
    lambda m, eps: PGD(m, eps, steps=5, norm="l2"),
    lambda m, eps: PGD(m, eps, steps=3, restarts=2),
    lambda m, eps: PGD(m, eps, steps=3, random_start="normal"),
    lambda m, eps: PGD(m, eps, steps=5, targeted=True),
    lambda m, eps: CW(m, eps, steps=5),
]


@pytest.mark.slow
@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("eps", [0.03, 0.3, 2.0])
def test_outputs_stay_in_the_box_and_the_ball(digits, make, eps):
    model, x, y = digits
    atk = make(model, eps)
    torch.manual_seed(0)
    x_adv = atk(x[:64], y[:64])
    assert x_adv.shape == x[:64].shape and not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x[:64]).flatten(1)
    size = delta.abs().amax(1) if atk.norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all(), f"{atk}: largest perturbation {size.max().item()} > eps {eps}"
    assert size.max() > 0.5 * min(eps, 0.5), f"{atk} barely moved the input"


@pytest.mark.slow
def test_pgd_beats_fgsm_and_noise(digits):
    model, x, y = digits
    eps = 0.2
    torch.manual_seed(0)
    clean = accuracy(model, x, y)
    noise = accuracy(model, (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1), y)
    fgsm = accuracy(model, FGSM(model, eps)(x, y), y)
    pgd = accuracy(model, PGD(model, eps, alpha=eps / 8, steps=20)(x, y), y)
    cw = accuracy(model, CW(model, eps, alpha=eps / 8, steps=20)(x, y), y)
    assert clean > 0.95
    assert noise > clean - 0.03, "uniform noise of the same eps should barely hurt"
    assert pgd < 0.05 and cw < 0.05
    assert fgsm > pgd + 0.10 and pgd < fgsm / 4, f"FGSM {fgsm:.3f} vs PGD {pgd:.3f}"


@pytest.mark.slow
def test_more_steps_and_restarts_never_help_the_model(digits):
    model, x, y = digits
    eps = 0.1
    torch.manual_seed(1)
    one = PGD(model, eps, steps=10)(x, y)
    torch.manual_seed(1)
    three = PGD(model, eps, steps=10, restarts=3)(x, y)
    with torch.no_grad():
        fooled_one, fooled_three = model(one).argmax(1) != y, model(three).argmax(1) != y
    # The first restart replays the single run, so every sample it fooled stays fooled.
    assert (fooled_three | ~fooled_one).all() and fooled_three.sum() >= fooled_one.sum()


@pytest.mark.slow
def test_targeted_pgd_reaches_the_target(digits):
    model, x, y = digits
    target = (y + 3) % 10
    torch.manual_seed(0)  # the random start
    x_adv = PGD(model, 0.3, alpha=0.03, steps=30, targeted=True)(x, y, target=target)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.9
    torch.manual_seed(0)
    x_rand = PGD(model, 0.3, alpha=0.03, steps=30, targeted=True)(x, y)
    with torch.no_grad():
        assert (model(x_rand).argmax(1) != y).float().mean().item() > 0.9


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    torch.testing.assert_close(margin_loss(logits, torch.tensor([0, 2])), torch.tensor([-1.0, 6.0]))


def test_project_l2_and_linf():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([0.4, -0.4, 0.4, -0.4]).view(1, 1, 2, 2)
    assert (project(far, x, 0.1, "linf") - x).abs().max().item() == pytest.approx(0.1)
    assert (project(far, x, 0.2, "l2") - x).flatten(1).norm(dim=1).tolist() == pytest.approx([0.2, 0.2])


def test_project_l2_leaves_points_inside_the_ball_alone():
    gen = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(6, 1, 4, 4, generator=gen)
    direction = torch.randn(x.shape, generator=gen)
    direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.19, 0.3]).view(-1, 1, 1, 1)
    x_adv = x + radius * direction  # within 0.15 of x per pixel, so the box never clips
    got = project(x_adv, x, 0.2, "l2")
    torch.testing.assert_close(got[:5], x_adv[:5], rtol=0, atol=1e-7)
    torch.testing.assert_close(got[5], x[5] + 0.2 * direction[5])


def test_one_l2_pgd_step_without_random_start_moves_alpha_along_the_gradient():
    """On a linear softmax model the CE gradient is (softmax - onehot) @ W, so one step of size
    alpha < eps is x + alpha * g / ||g||, left where it lands."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = 0.4 + 0.2 * torch.rand(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        grad = ((p - F.one_hot(y, 3).float()) @ model[1].weight).view_as(x)
    expected = x + 0.05 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    got = PGD(model, eps=0.5, alpha=0.05, steps=1, norm="l2", random_start=False)(x, y)
    torch.testing.assert_close(got, expected)
    assert (got - x).flatten(1).norm(dim=1).tolist() == pytest.approx([0.05] * 5)


class ModeProbe(nn.Module):
    """Batch norm and dropout make a training-mode forward visible; counts its forwards by mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.out(self.drop(self.bn(self.fc(x.flatten(1)))))


@pytest.mark.parametrize("make", ALL)
def test_attacks_leave_mode_grads_and_buffers_alone(make):
    torch.manual_seed(0)
    model = ModeProbe().train()
    model.drop.eval()  # a mixed-mode model must come back mixed
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.out.bias.grad = None
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    make(model, 0.1)(x, y)
    assert model.modes and not any(model.modes), "the attack must run the model in eval mode"
    assert model.training and model.fc.training and model.bn.training and not model.drop.training
    assert model.out.bias.grad is None
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for n, p in model.named_parameters() if n != "out.bias")
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_eps_zero_returns_the_input(digits):
    model, x, y = digits
    assert torch.equal(PGD(model, 0.0)(x[:4], y[:4]), x[:4])
    assert torch.equal(FGSM(model, 0.0)(x[:4], y[:4]), x[:4])


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": -0.1}, r"eps=-0.1: must be a number >= 0"),
    ({"eps": 0.1, "steps": 0}, r"steps=0: must be an integer >= 1"),
    ({"eps": 0.1, "steps": 2.5}, r"steps=2.5"),
    ({"eps": 0.1, "alpha": 0}, r"alpha=0: the step size must be a number > 0"),
    ({"eps": 0.1, "norm": "l1"}, r"norm='l1' is unknown; expected one of linf, l2"),
    ({"eps": 0.1, "restarts": 0}, r"restarts=0"),
    ({"eps": 0.1, "random_start": "gaussian"}, r"random_start='gaussian'"),
    ({"eps": 0.1, "loss": "hinge"}, r"loss='hinge' is unknown"),
])
def test_bad_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PGD(nn.Linear(4, 2), **kwargs)


@pytest.mark.slow
def test_bad_calls_raise_clear_errors(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match=r"got x \(4, 1, 8, 8\) and y \(3,\)"):
        PGD(model, 0.1)(x[:4], y[:3])
    with pytest.raises(ValueError, match="target= was given to an untargeted attack"):
        PGD(model, 0.1)(x[:4], y[:4], target=y[:4])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        FGSM(lambda t: t, 0.1)


def test_autoattack_without_torchattacks_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ImportError, match=r"pip install 'neurosens\[attacks\]'"):
        AutoAttack(nn.Linear(4, 2), 0.1)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs the optional torchattacks package")
def test_pgd_agrees_with_torchattacks(digits):
    import torchattacks

    model, _, _ = digits
    x, y = torch.cat([data.digits(True, size=8).tensors()[0], digits[1]]), torch.cat([data.digits(True, size=8).labels, digits[2]])
    eps, alpha, steps = 0.1, 0.0125, 20
    torch.manual_seed(0)
    ours = accuracy(model, PGD(model, eps, alpha, steps)(x, y), y)
    torch.manual_seed(0)
    theirs = accuracy(model, torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y), y)
    assert 0.1 < ours < 0.9, "pick eps so the comparison is not trivially 0 or 1"
    assert abs(ours - theirs) <= 0.015, f"robust accuracy: ours {ours:.4f}, torchattacks {theirs:.4f}"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs the optional torchattacks package")
def test_autoattack_is_at_least_as_strong_as_pgd(digits):
    model, x, y = digits
    x, y = x[:64], y[:64]
    model.train()
    torch.manual_seed(0)
    pgd = accuracy(model.eval(), PGD(model, 0.1, steps=20)(x, y), y)
    model.train()
    x_aa = AutoAttack(model, 0.1, num_classes=10)(x, y)
    assert model.training
    assert (x_aa - x).abs().max() <= 0.1 + 1e-6 and x_aa.min() >= 0 and x_aa.max() <= 1
    assert accuracy(model.eval(), x_aa, y) <= pgd + 1 / 64


def test_registry_names_every_attack():
    assert set(attacks.ATTACKS) == {"fgsm", "pgd", "cw", "autoattack", "square", "neuron-pgd", "feature-pgd"}
    assert attacks.ATTACKS["cw"](nn.Linear(4, 2), 0.1).loss == "cw"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,norm,eps", [("pgd", "linf", 8 / 255), ("fgsm", "linf", 8 / 255), ("pgd", "l2", 0.5)])
def test_16_bit_adversarial_examples_stay_inside_the_ball_after_rounding(dtype, name, norm, eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).to(dtype)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.arange(16) % 10
    x_adv = make_attack(name, model, eps, norm, steps=5)(x, y)
    assert x_adv.dtype == dtype
    moved = x_adv.double() - x.double()
    size = moved.abs().flatten(1).amax(1) if norm == "linf" else moved.flatten(1).norm(dim=1)
    assert size.max() <= eps * (1 + 1e-6)
    assert size.min() > 0.9 * eps  # still at the edge, not pulled far inside
    assert 0 <= x_adv.min() and x_adv.max() <= 1


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw"])
def test_integer_inputs_such_as_token_ids_are_refused_in_one_line(name):
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(48, 10))
    ids = torch.randint(0, 50, (4, 6))
    with pytest.raises(TypeError, match=r"x is torch.int64, but an attack perturbs real-valued inputs; for token ids"):
        make_attack(name, model, 0.1, steps=2)(ids, torch.zeros(4, dtype=torch.long))
