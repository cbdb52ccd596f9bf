"""The neuron-targeted attack, the worst case over attacks and the gradient-masking checks, each
against an independent computation: hooks and plain PyTorch, per-sample loops, closed forms."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurosens.attacks import FGSM, PGD, FeaturePGD, NeuronPGD, make_attack
from neurosens.checkpoint import save_checkpoint
from neurosens.cli import main
from neurosens.evaluation import (check_masking_options, default_eps_grid, full_range_eps, masking_checks, survived_all,
                                  worst_case, worst_case_attacks)
from neurosens.models import build_model

from conftest import SPEC, outputs_by_hooks, trained_on_digits

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None
HIDDEN = ["conv1", "conv2", "fc1"]


@pytest.fixture(scope="module")
def digits():
    """The :data:`SPEC` CNN trained briefly on the 8x8 digits (a couple of seconds), and 48 test images."""
    model, xt, yt = trained_on_digits(lambda: build_model(**SPEC), 15)
    return model, xt[:48], yt[:48]


def feature_by_hand(model, x, x_adv, names, k):
    """Per sample: mean over layers of the mean L1 distance (mean |a - b| over each neuron's map)
    of the k-fraction of neurons with the largest batch-mean distance (ties: lower index)."""
    with torch.no_grad():
        _, benign = outputs_by_hooks(model, x, names)
    logits, adv = outputs_by_hooks(model, x_adv, names)
    terms = []
    for n in names:
        diff = (benign[n] - adv[n]).abs()
        dist = diff.flatten(2).mean(2) if diff.dim() > 2 else diff  # [N, C]
        count = max(1, math.floor(k * dist.shape[1] + 0.5))
        chosen = sorted(range(dist.shape[1]), key=lambda c: (-dist[:, c].mean().item(), c))[:count]
        terms.append(dist[:, chosen].mean(1))
    return logits, torch.stack(terms).mean(0)


def test_objective_and_its_step_match_a_hand_computation(digits):
    model, x, y = digits
    eps, alpha, weight, k = 0.2, 0.05, 0.7, 0.3
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    atk = NeuronPGD(model, eps, alpha, steps=1, random_start=False, layers="hidden", k=k, weight=weight)
    assert atk.layers == HIDDEN
    xr = x_adv.clone().requires_grad_(True)
    logits, feature = feature_by_hand(model, x, xr, HIDDEN, k)
    expected = F.cross_entropy(logits, y, reduction="none") + weight * feature
    torch.testing.assert_close(atk.objective(x, x_adv, y), expected.detach(), rtol=1e-5, atol=1e-6)

    # One step from x (no random start) moves every pixel by alpha along the sign of the gradient.
    xr = x.clone().requires_grad_(True)
    logits, feature = feature_by_hand(model, x, xr, HIDDEN, k)
    grad, = torch.autograd.grad((F.cross_entropy(logits, y, reduction="sum") + weight * feature.sum()), xr)
    step = (x + alpha * grad.sign()).clamp(0, 1)
    got = atk(x, y)
    clear = grad.abs() > 1e-6 * grad.abs().max()  # signs of gradients at rounding level may differ
    assert clear.float().mean() > 0.5
    torch.testing.assert_close(got[clear], step[clear], rtol=0, atol=1e-6)


def test_feature_only_objective_and_margin_loss(digits):
    model, x, y = digits
    x_adv = (x + 0.1).clamp(0, 1)
    _, feature = feature_by_hand(model, x, x_adv, ["conv1", "conv2", "fc1", "fc2"], 0.3)
    pure = FeaturePGD(model, 0.1, weight=2.0)
    torch.testing.assert_close(pure.objective(x, x_adv, y), 2.0 * feature.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(x_adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    cw = NeuronPGD(model, 0.1, loss="cw", weight=2.0)
    torch.testing.assert_close(cw.objective(x, x_adv, y), other - true + 2.0 * feature.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("restarts", [1, 2])
def test_weight_zero_is_pgd_exactly(digits, restarts):
    model, x, y = digits
    torch.manual_seed(3)
    pgd = PGD(model, 0.15, steps=5, restarts=restarts)(x, y)
    torch.manual_seed(3)
    neuron = NeuronPGD(model, 0.15, steps=5, restarts=restarts, weight=0.0)(x, y)
    assert torch.equal(pgd, neuron)
    torch.manual_seed(3)
    assert not torch.equal(pgd, NeuronPGD(model, 0.15, steps=5, restarts=restarts, weight=1.0)(x, y))


def test_feature_only_moves_the_chosen_neurons_further_than_pgd(digits):
    model, x, y = digits
    eps = 0.1
    torch.manual_seed(0)
    pgd = PGD(model, eps, steps=10)(x, y)
    torch.manual_seed(0)
    pure = FeaturePGD(model, eps, steps=10, layers="hidden")(x, y)
    with torch.no_grad():
        _, by_pgd = feature_by_hand(model, x, pgd, HIDDEN, 0.3)
        _, by_feature = feature_by_hand(model, x, pure, HIDDEN, 0.3)
    assert by_feature.mean() > 1.05 * by_pgd.mean()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("cls", [NeuronPGD, FeaturePGD])
def test_outputs_stay_in_the_ball_and_the_box(digits, norm, eps, cls):
    model, x, y = digits
    clip = (0.1, 0.9)
    x = x.clamp(*clip)
    x_adv = cls(model, eps, steps=4, norm=norm, clip=clip, restarts=2)(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5 and size.max() > eps / 2
    assert x_adv.min() >= clip[0] and x_adv.max() <= clip[1]
    assert not x_adv.requires_grad


def test_attack_restores_modes_and_leaves_no_hooks(digits):
    model, x, y = digits
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        NeuronPGD(model, 0.1, steps=2)(x[:8], y[:8])
        assert all(m.training for m in model.modules())
        assert all(not m._forward_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_worst_case_is_the_per_sample_and(digits):
    model, x, y = digits
    # Deterministic attacks (no random start), so each can be rerun on its own here.
    attacks = {"fgsm": FGSM(model, 0.08), "pgd": PGD(model, 0.05, steps=5, random_start=False),
               "neuron": FeaturePGD(model, 0.08, steps=5, random_start=False, layers="hidden")}
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    result = worst_case(model, loader, attacks)
    right = [[], [], [], []]
    for xb, yb in loader:
        with torch.no_grad():
            for i, inputs in enumerate([xb] + [attack(xb, yb) for attack in attacks.values()]):
                right[i] += (model(inputs).argmax(1) == yb).tolist()
    survivors = sum(all(column) for column in zip(*right))
    assert result["worst"] == pytest.approx(survivors / len(y))
    for i, name in enumerate(["clean", *attacks]):
        assert result[name] == pytest.approx(sum(right[i]) / len(y))
    # The attacks fool different samples, so the AND is not simply one attack's column.
    assert len({tuple(column) for column in right[1:]}) == 3
    assert result["worst"] <= min(result[name] for name in attacks)
    assert survived_all({"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, True])}) == pytest.approx(1 / 3)


def test_worst_case_attacks_are_pgd_autoattack_and_the_neuron_attack(digits):
    model = digits[0]
    attacks = worst_case_attacks(model, 0.1, steps=7, autoattack=False, layers="hidden", weight=2.0, loss="cw")
    assert list(attacks) == ["pgd-7", "neuron-pgd-7"]
    assert attacks["pgd-7"].steps == 7 and type(attacks["pgd-7"]) is PGD
    neuron = attacks["neuron-pgd-7"]
    assert (neuron.layers, neuron.weight, neuron.loss, neuron.steps) == (HIDDEN, 2.0, "cw", 7)
    if HAS_TORCHATTACKS:
        assert list(worst_case_attacks(model, 0.1, steps=7)) == ["pgd-7", "autoattack", "neuron-pgd-7"]


class Quantized(nn.Module):
    """The model on its input rounded to 1/2 steps: gradients with respect to the input are 0."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 2) / 2)


@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs the optional torchattacks package")
def test_masking_checks_flag_a_masked_model_and_pass_a_normal_one(digits):
    model, x, y = digits
    loader = [(x, y)]
    normal = masking_checks(model, loader, 0.1, steps=(5, 10, 20), queries=300)
    assert normal["passed"], normal
    assert normal["eps_curve"]["accuracy"][-1] == 0.0
    assert normal["eps_curve"]["eps"] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    masked_model = Quantized(model).eval()
    masked = masking_checks(masked_model, loader, 0.1, steps=(5, 10, 20), queries=300)
    assert not masked["passed"]
    assert not masked["black_box"]["passed"] and masked["black_box"]["square"] < masked["black_box"]["white_box"]
    assert not masked["eps_curve"]["passed"] and masked["eps_curve"]["accuracy"][-1] > 0.01
    # The numbers are each attack's accuracy, rerun here with the same seed.
    torch.manual_seed(0)
    with torch.no_grad():
        again = (masked_model(PGD(masked_model, 0.1, steps=20)(x, y)).argmax(1) == y).float().mean().item()
    assert masked["steps"]["accuracy"][-1] == pytest.approx(again)


def test_the_eps_curve_ends_where_the_ball_holds_every_input():
    # L-inf: a ball of radius 1 around any [0, 1] image holds every image; L2: the diagonal, sqrt(d).
    assert full_range_eps("linf", 64) == 1.0
    assert full_range_eps("l2", 64) == pytest.approx(8.0)
    assert default_eps_grid(0.3, 1.0) == pytest.approx([0.15, 0.3, 0.6, 1.0])
    assert default_eps_grid(1.0, 8.0) == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])


def test_the_masking_grid_of_an_l2_budget_climbs_to_the_ball_that_holds_every_input():
    # An 8x8 image: the L2 ball of radius 8 around any [0, 1] image holds every other one.
    assert check_masking_options(2.0, [10, 20], None, 100, 0.01, full_range_eps("l2", 64)) == ([10, 20], [1.0, 2.0, 4.0, 8.0])
    assert check_masking_options(2.0, [10, 20], None, 100, 0.01) == ([10, 20], None)


@pytest.mark.parametrize("make,message", [
    (lambda m: NeuronPGD(m, 0.1, weight=-1), r"weight=-1 must be a finite number >= 0"),
    (lambda m: FeaturePGD(m, 0.1, weight=0), r"weight=0 leaves the feature-only attack nothing"),
    (lambda m: NeuronPGD(m, 0.1, layers="fc9"), r"no layer named 'fc9'"),
    (lambda m: NeuronPGD(m, 0.1, k=100), r"layer 'conv1'.*k=100 is out of range"),
    (lambda m: NeuronPGD(m, 0.1, metric="l3"), r"unknown metric='l3'"),
    (lambda m: NeuronPGD(m, 0.1, steps=0), r"steps=0"),
    (lambda m: make_attack("pgd", m, 0.1, weight=1.0), r"attack 'pgd' takes no option weight"),
    (lambda m: make_attack("neuron-pgd", m, 0.1, queries=5), r"takes no option queries"),
    (lambda m: check_masking_options(0.1, [10], None, 100, 0.01), r"steps=\[10\]"),
    (lambda m: check_masking_options(0.1, [10, 20], [0.1, 0.5], 100, 0.01, 1.0), r"must reach 1, where the eps-ball holds every input"),
    (lambda m: check_masking_options(1.5, [10, 20], None, 100, 0.01, 1.0), r"eps=1.5 already spans the whole input range"),
    (lambda m: check_masking_options(0.1, [10, 20], None, 0, 0.01), r"queries=0"),
])
def test_bad_options_raise_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make(build_model(**SPEC))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("adaptive") / "model.pt"
    save_checkpoint({"model": digits[0].state_dict(), "meta": {"model": SPEC, "data": "digits8"},
                     "config": {"eps": 0.1}}, path)
    return str(path)


def test_eval_command_runs_the_adaptive_attacks_and_the_worst_case(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", checkpoint, "--attacks", "clean,pgd,neuron-pgd,feature-pgd", "--steps", "5", "-n", "40",
                 "--neuron-layers", "hidden", "--neuron-k", "2", "--neuron-weight", "0.5", "--worst-case",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"clean", "pgd-5", "neuron-pgd-5", "feature-pgd-5", "worst"}
    assert rows["worst"]["accuracy"] <= min(row["accuracy"] for row in rows.values())
    assert report["neuron"] == {"layers": "hidden", "k": 2, "weight": 0.5, "metric": "l1", "loss": "ce"}
    assert "worst" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs the optional torchattacks package")
def test_eval_command_prints_the_masking_verdicts(checkpoint, capsys):
    assert main(["eval", checkpoint, "--attacks", "clean", "-n", "24", "--check-masking", "--masking-steps", "3,6",
                 "--square-queries", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for check in ("black-box", "eps curve", "steps", "overall"):
        assert any(line.strip().startswith(check) and ("pass" in line or "FAIL" in line) for line in lines), check


@pytest.mark.parametrize("argv,fragment", [
    (["--attacks", "neuron-pgd", "--neuron-k", "0"], "--neuron-k"),
    (["--attacks", "neuron-pgd", "--neuron-k", "many"], "--neuron-k"),
    (["--attacks", "neuron-pgd", "--neuron-layers", "fc9"], "fc9"),
    (["--attacks", "neuron-pgd", "--neuron-k", "40"], "k=40 is out of range"),
    (["--attacks", "feature-pgd", "--neuron-weight", "0"], "--neuron-weight 0"),
    (["--attacks", "neuron-pgd", "--neuron-metric", "l3"], "--neuron-metric"),
    (["--attacks", "clean", "--check-masking", "--masking-steps", "40,10"], "--masking-steps"),
    (["--attacks", "clean", "--masking-tol", "2"], "--masking-tol"),
])
def test_eval_command_bad_options_give_one_line(checkpoint, capsys, monkeypatch, argv, fragment):
    import neurosens.data

    monkeypatch.setattr(neurosens.data, "load", lambda *a, **k: pytest.fail("data loaded before the options were checked"))
    try:
        code = main(["eval", checkpoint, *argv])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    if isinstance(code, str):
        err, code = err + code, 1
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
