"""Wrong results that used to pass silently: each case now gives the right number or one clear error."""
import json

import pytest
import torch
from torch import nn

from neurosens import NeuronSensitivity, SNSRegularizer, measure
from neurosens.reference import neuron_distance_per_sample
from neurosens.training import Trainer, TrainConfig

from conftest import SPEC, digits8, fresh_model

pytestmark = pytest.mark.usefixtures("one_thread")


class BNInplaceReLU(nn.Module):
    """conv -> bn -> ReLU(inplace=True): the bn output is overwritten after its hook ran."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def test_sns_refuses_outputs_changed_in_place_after_capture():
    torch.manual_seed(0)
    model = BNInplaceReLU()
    x, x_adv = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    reg = SNSRegularizer(model, layers=["bn"], k=2)
    with reg.capture():
        model(x), model(x_adv)
    with pytest.raises(RuntimeError, match=r"SNS layer 'bn': its output was modified in place .*ReLU\(inplace=True\)"):
        reg.loss()
    # The layer before the in-place op is fine, and its term matches the reference.
    reg = SNSRegularizer(model, layers=["conv"], k=4)
    with reg.capture():
        model(x), model(x_adv)
    term = reg.loss()
    a, b = model.conv(x), model.conv(x_adv)
    torch.testing.assert_close(term, neuron_distance_per_sample(a, b).mean(), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    """One Linear applied twice per forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_sns_refuses_a_layer_called_twice_in_one_concatenated_forward():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(4, 6)
    reg = SNSRegularizer(model, layers=["lin"], k=2)
    with reg.capture():
        model(torch.cat([x, x]))  # x_adv == x: the true term is 0
    with pytest.raises(RuntimeError, match=r"SNS layer 'lin' ran 2 times in one forward"):
        reg.loss()
    # Two forwards, one call each per forward: paired as benign/adversarial.
    single = nn.Sequential(nn.Linear(6, 6))
    reg = SNSRegularizer(single, layers=["0"], k=2)
    with reg.capture():
        single(x), single(x)
    assert reg.loss().item() == 0.0


class SometimesTwice(nn.Module):
    """``act`` runs a second time only on batches whose first input is positive."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.act(self.lin(x))
        if x[0, 0] > 0:
            h = self.act(h * 2)
        return h


def test_measure_divides_each_call_by_the_samples_that_reached_it():
    torch.manual_seed(0)
    model = SometimesTwice()
    batches = []
    for sign in (1.0, -1.0, 1.0):
        x = torch.randn(4, 3)
        x[0, 0] = sign
        batches.append((x, x + 0.1 * torch.randn(4, 3)))
    report = measure(model, batches, layers=["act"], progress=False)
    first, second = [], []
    with torch.no_grad():
        for x, xa in batches:
            h, ha = torch.tanh(model.lin(x)), torch.tanh(model.lin(xa))
            first.append(neuron_distance_per_sample(h, ha))
            if x[0, 0] > 0:
                second.append(neuron_distance_per_sample(torch.tanh(2 * h), torch.tanh(2 * ha)))
    torch.testing.assert_close(report["act#0"], torch.cat(first).double().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(report["act#1"], torch.cat(second).double().mean(0), rtol=1e-5, atol=1e-7)
    assert report.meta["samples"] == 12 and report.meta["layers"]["act#1"]["samples"] == 8


def test_a_failing_batch_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    meter = NeuronSensitivity(model, layers=["0"])
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    meter.update(x, x + 0.1, y=y)
    before = meter.compute()
    with pytest.raises(ValueError, match=r"NeuronSensitivity.update: y has shape \[3\]; expected \[4\]"):
        meter.update(x, x + 0.1, y=y[:3])
    assert meter.samples == 4
    after = meter.compute()
    assert torch.equal(after["0"], before["0"]) and after.meta["clean_accuracy"] == before.meta["clean_accuracy"]


def test_measure_says_the_attack_is_missing_for_labelled_batches():
    model = nn.Sequential(nn.Linear(5, 3))
    loader = [(torch.randn(8, 5), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match=r"measure: .*labels.*give attack="):
        measure(model, loader, progress=False)


def config(**overrides):
    base = dict(method="standard", epochs=2, batch_size=64, optimizer="sgd", lr=0.05, eps=0.1, steps=2, eval_steps=2,
                eval_limit=0, progress=False)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("change, message", [
    ({"lr": 0.1}, r"lr: 0.05 -> 0.1"),
    ({"seed": 3, "eps": 0.2}, r"eps: 0.1 -> 0.2; seed: 0 -> 3"),
    ({"method": "pgd_at"}, r"method: 'standard' -> 'pgd_at'"),
    ({"optimizer": "adam"}, r"optimizer: 'sgd' -> 'adam'"),
])
def test_resume_with_changed_options_is_refused(tmp_path, change, message):
    train, _ = digits8(128)
    Trainer(fresh_model(), train, None, config(), out_dir=tmp_path, meta={"model": SPEC}).fit(until=1)
    trainer = Trainer(fresh_model(), train, None, config(**change), out_dir=tmp_path, meta={"model": SPEC})
    with pytest.raises(ValueError, match=f"cannot resume .*{message}"):
        trainer.fit(resume=True)


def test_resume_refuses_another_model_or_training_set_and_allows_safe_changes(tmp_path):
    train, _ = digits8(128)
    Trainer(fresh_model(), train, None, config(), out_dir=tmp_path, meta={"model": SPEC}).fit(until=1)
    wider = dict(SPEC, width=16)
    with pytest.raises(ValueError, match=r"meta.model.width: 8 -> 16"):
        Trainer(build_wider(wider), train, None, config(), out_dir=tmp_path, meta={"model": wider}).fit(resume=True)
    smaller, _ = digits8(64)
    with pytest.raises(ValueError, match=r"training samples: 128 -> 64"):
        Trainer(fresh_model(), smaller, None, config(), out_dir=tmp_path, meta={"model": SPEC}).fit(resume=True)
    history = Trainer(fresh_model(), train, None, config(progress=True, num_workers=0), out_dir=tmp_path,
                      meta={"model": SPEC}).fit(resume=True)
    assert [h["epoch"] for h in history] == [1, 2]


def build_wider(spec):
    from neurosens.models import build_model

    return build_model(**spec)


def test_interrupted_runs_leave_no_debris(tmp_path, monkeypatch):
    import neurosens.training as training

    train, _ = digits8(128)
    stale = tmp_path / ".checkpoint.pt.tmp99999"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half a file")
    real, calls = training.save_checkpoint, []

    def crash_on_second(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(training, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh_model(), train, None, config(epochs=3), out_dir=tmp_path).fit()
    assert not stale.exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert state["epoch"] == 1 and [h["epoch"] for h in lines] == [1]


def test_captures_and_the_neuron_attack_refuse_outputs_changed_in_place():
    from neurosens.attacks import NeuronPGD
    from neurosens.capture import ActivationCapture, capture_activations

    torch.manual_seed(0)
    model = BNInplaceReLU().eval()
    x = torch.randn(4, 2, 5, 5)
    refusal = r"layer 'bn': its output was modified in place .*ReLU\(inplace=True\)"
    with pytest.raises(RuntimeError, match="captured " + refusal):
        capture_activations(model, x, layers="bn")
    with pytest.raises(RuntimeError, match="NeuronPGD " + refusal):
        NeuronPGD(model, 0.1, layers="bn", k=2, feature_only=True).objective(x, x + 0.1, torch.zeros(4, dtype=torch.long))
    # The conv before it is kept as the conv computed it.
    with ActivationCapture(model, layers="conv") as cap, torch.no_grad():
        model(x)
    torch.testing.assert_close(cap.activations["conv"], model.conv(x), rtol=0, atol=0)
    assert cap.activations["conv"].min() < 0
    # Inference tensors carry no version counter: the capture keeps the values as the layer gave them.
    with torch.inference_mode(), ActivationCapture(model, layers="bn") as cap:
        model(x)
        expected = model.bn(model.conv(x))
    torch.testing.assert_close(cap.activations["bn"], expected, rtol=0, atol=0)
    assert cap.activations["bn"].min() < 0
