"""Models whose output holds the logits in a dict or a tuple: every entry point finds them through
``logits=`` and gives the results of the same network returning plain logits."""
import pytest
import torch
from torch import nn

import neurosens as ns
from neurosens.attacks import AutoAttack, make_attack
from neurosens.evaluation import evaluate
from neurosens.interventions import intervention_curve
from neurosens.methods import make_loss
from neurosens.outputs import logits_of
from neurosens.training import TrainConfig, Trainer

from conftest import digits8, fresh_model


class AsDict(nn.Module):
    """The same network, its logits under "out" beside an auxiliary tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return {"aux": logits.detach() * 0, "out": logits}


class AsTuple(AsDict):
    def forward(self, x):
        logits = self.net(x)
        return (logits.sum(1), logits)


@pytest.fixture(scope="module")
def batch():
    _, test = digits8()
    x, y = test.tensors()[0][:40], test.labels[:40]
    return x, y


WRAPPED = [(AsDict, "out"), (AsTuple, 1), (AsDict, lambda out: out["out"])]


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "cw"])
@pytest.mark.parametrize("wrap,where", WRAPPED)
def test_attacks_on_wrapped_outputs_equal_the_plain_model(batch, attack, wrap, where):
    x, y = batch
    plain = fresh_model()
    wrapped = wrap(plain)
    torch.manual_seed(1)
    expected = make_attack(attack, plain, 0.2, steps=5)(x, y)
    torch.manual_seed(1)
    got = make_attack(attack, wrapped, 0.2, steps=5, logits=where)(x, y)
    assert torch.equal(got, expected)
    assert not torch.equal(got, x)


def test_targeted_attack_reads_the_class_count_from_the_logits(batch):
    x, y = batch
    plain = fresh_model()
    torch.manual_seed(2)
    expected = ns.PGD(plain, 0.2, steps=3, targeted=True)(x, y)
    torch.manual_seed(2)
    assert torch.equal(ns.PGD(AsDict(plain), 0.2, steps=3, targeted=True, logits="out")(x, y), expected)


def test_a_dict_output_without_logits_is_one_clear_error(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"PGD: the model returned a dict with keys 'aux', 'out', not a logits tensor; "
                                         r"say where the logits are with logits="):
        ns.PGD(AsDict(fresh_model()), 0.1, steps=2)(x, y)
    with pytest.raises(ValueError, match=r"logits='logit' finds nothing in the model's dict output \(KeyError"):
        ns.PGD(AsDict(fresh_model()), 0.1, steps=2, logits="logit")(x, y)
    with pytest.raises(ValueError, match=r"FGSM: logits=2.5: say where the logits are"):
        ns.FGSM(fresh_model(), 0.1, logits=2.5)


def test_measure_counts_accuracies_from_the_logits_or_says_it_cannot(batch):
    x, y = batch
    plain = fresh_model()
    torch.manual_seed(3)
    expected = ns.measure(plain, [(x, y)], ns.PGD(plain, 0.2, steps=3), progress=False)
    for wrap, where in WRAPPED:
        wrapped = wrap(plain)
        torch.manual_seed(3)
        got = ns.measure(wrapped, [(x, y)], ns.PGD(wrapped, 0.2, steps=3, logits=where), progress=False)
        assert got.meta["clean_accuracy"] == expected.meta["clean_accuracy"]
        assert got.meta["adversarial_accuracy"] == expected.meta["adversarial_accuracy"]
        # The accuracies are the fraction of the 40 labels the plain logits get right.
        torch.manual_seed(3)
        x_adv = ns.PGD(plain, 0.2, steps=3)(x, y)
        assert got.meta["adversarial_accuracy"] == (plain(x_adv).argmax(1) == y).sum().item() / len(y)
        for layer in expected.layers:
            assert torch.equal(got["net." + layer], expected[layer])
    x_adv = x + 0.1
    with pytest.raises(ValueError, match="NeuronSensitivity .labels given, accuracies counted.: the model returned a dict"):
        ns.measure(AsDict(plain), [(x, x_adv, y)], progress=False)
    unlabelled = ns.measure(AsDict(plain), [(x, x_adv)], progress=False)
    assert "clean_accuracy" not in unlabelled.meta


def test_evaluate_and_interventions_read_the_logits(batch):
    x, y = batch
    plain = fresh_model()
    loader = [(x, y)]
    attack = ns.PGD(plain, 0.2, steps=3)
    torch.manual_seed(4)
    expected = evaluate(plain, loader, {"pgd": attack})
    wrapped = AsTuple(plain)
    torch.manual_seed(4)
    assert evaluate(wrapped, loader, {"pgd": ns.PGD(wrapped, 0.2, steps=3, logits=1)}, logits=1) == expected
    x_adv = attack(x, y)
    report = ns.measure(plain, [(x, x_adv, y)], layers="fc1", progress=False)
    curve = intervention_curve(plain, [(x, x_adv, y)], "fc1", report, ks=(2, 8), mode="zero", progress=False)
    wrapped_report = ns.measure(wrapped, [(x, x_adv, y)], layers="net.fc1", logits=1, progress=False)
    got = intervention_curve(wrapped, [(x, x_adv, y)], "net.fc1", wrapped_report, ks=(2, 8), mode="zero", progress=False,
                             logits=1)
    for key in ("k", "benign", "adversarial", "baseline"):
        assert got[key] == curve[key]
    assert curve["baseline"][0] == (plain(x).argmax(1) == y).sum().item() / len(y)


@pytest.mark.parametrize("method", ["standard", "pgd_at", "trades", "alp", "sns"])
def test_training_losses_on_a_dict_output_equal_the_plain_ones(batch, method):
    x, y = batch
    plain = fresh_model()
    wrapped = AsDict(plain)
    options = {"beta": 6.0}
    torch.manual_seed(5)
    loss, logs = make_loss(method, model=plain, **options)(plain, x, y, ns.PGD(plain, 0.2, steps=3))
    torch.manual_seed(5)
    got, got_logs = make_loss(method, model=wrapped, **options)(wrapped, x, y, ns.PGD(wrapped, 0.2, steps=3, logits="out"))
    assert torch.allclose(got, loss, rtol=1e-6, atol=0)
    assert logs.keys() == got_logs.keys()


def test_trainer_takes_the_logits_key(tmp_path):
    train, test = digits8(limit=64)
    config = TrainConfig(method="pgd_at", epochs=1, batch_size=32, eps=0.1, steps=2, eval_steps=2, eval_limit=32,
                         optimizer="adam", lr=1e-3, progress=False)
    torch.manual_seed(0)
    plain = fresh_model()
    expected = Trainer(plain, train, test, config).fit()
    wrapped = AsDict(fresh_model())
    got = Trainer(wrapped, train, test, TrainConfig(**{**config.to_dict(), "logits": "out"})).fit()
    assert got[-1]["train_loss"] == pytest.approx(expected[-1]["train_loss"], rel=1e-6)
    assert got[-1]["test_pgd"] == expected[-1]["test_pgd"]
    with pytest.raises(ValueError, match="TrainConfig: logits= must be a key or an index"):
        TrainConfig(logits=lambda out: out)


def test_autoattack_sees_the_logits(batch):
    pytest.importorskip("torchattacks")
    x, y = batch
    plain = fresh_model()
    got = AutoAttack(AsDict(plain), 0.05, logits="out", version="rand")
    assert torch.equal(got._attack.model(x), plain(x))


def test_logits_of_takes_the_output_itself_by_default():
    t = torch.randn(3, 4)
    assert logits_of(t) is t
    assert logits_of((t, t + 1), 1).equal(t + 1)
