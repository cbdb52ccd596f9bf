"""SNS's layer presets and neuron selections against hand-written references."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from neurosens.checkpoint import load_checkpoint
from neurosens.cli import main
from neurosens.models import build_model
from neurosens.sns import SNSRegularizer
from neurosens.training import Trainer, TrainConfig

from conftest import digits8, fresh_model, outputs_by_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def mnist_cnn():
    torch.manual_seed(0)
    return build_model("small-cnn", num_classes=10, in_channels=1, input_size=28)


def pair(n=6, seed=1):
    """A batch of 28x28 images and a noisy twin."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=gen)
    return x, (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def per_sample_l1(a, b):
    """[N, C]: mean |a - b| over each neuron's positions (channels on dim 1)."""
    return (a - b).abs().flatten(2).mean(-1) if a.dim() > 2 else (a - b).abs()


def sns_term(reg, model, x, x_adv):
    with reg.capture():
        model(torch.cat([x, x_adv]))
    return reg.loss()


@pytest.mark.parametrize("preset, names", [
    ("hidden", ["conv1", "conv2", "fc1"]),
    ("logits", ["fc2"]),
    ("all", ["conv1", "conv2", "fc1", "fc2"]),
    ("auto", ["conv1", "conv2", "fc1", "fc2"]),
    (["conv2", "fc2"], ["conv2", "fc2"]),
])
def test_presets_on_the_small_cnn(preset, names):
    assert list(SNSRegularizer(mnist_cnn(), layers=preset).modules) == names


def test_the_logits_preset_is_the_layer_whose_output_is_the_models():
    model = mnist_cnn()
    x, _ = pair()
    (name,) = SNSRegularizer(model, layers="logits").modules
    logits, got = outputs_by_hooks(model, x, [name])
    assert torch.equal(got[name], logits)


def test_hidden_needs_a_layer_before_the_logits():
    with pytest.raises(ValueError, match="no conv_linear layer before 'fc'"):
        SNSRegularizer(nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(4, 2))), layers="hidden")


def test_random_selection_draws_k_seeded_neurons_each_refresh():
    model = mnist_cnn()
    x, x_adv = pair()
    reg = SNSRegularizer(model, layers="hidden", k=4, select="random", seed=7)
    term = sns_term(reg, model, x, x_adv)
    gen = torch.Generator().manual_seed(7)
    sizes = {"conv1": 16, "conv2": 32, "fc1": 128}
    expected = {name: torch.randperm(c, generator=gen)[:4].sort().values for name, c in sizes.items()}
    for name in sizes:
        assert torch.equal(reg.selections[name], expected[name]), name
    _, got = outputs_by_hooks(model, torch.cat([x, x_adv]), list(sizes))
    terms = [per_sample_l1(*got[name].chunk(2))[:, expected[name]].mean() for name in sizes]
    torch.testing.assert_close(term, torch.stack(terms).mean())
    # The next refresh draws again from the same generator.
    sns_term(reg, model, x, x_adv)
    for name, c in sizes.items():
        assert torch.equal(reg.selections[name], torch.randperm(c, generator=gen)[:4].sort().values), name
    topk = SNSRegularizer(model, layers="hidden", k=4)
    sns_term(topk, model, x, x_adv)
    assert any(not torch.equal(topk.selections[n], reg.selections[n]) for n in sizes)


@pytest.mark.slow
def test_random_selection_is_the_same_for_a_seed_and_across_a_resume(tmp_path):
    train, test = digits8(256)
    cfg = TrainConfig(method="sns", epochs=3, batch_size=64, optimizer="sgd", lr=0.05, eps=0.1, steps=3, eval_steps=3,
                      eval_limit=64, progress=False, sns_layers="hidden", sns_select="random", sns_seed=3, sns_k=2,
                      sns_refresh=3)
    whole = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "whole")
    history = whole.fit()
    first = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "split")
    first.fit(until=1)
    resumed = Trainer(fresh_model(seed=5), train, test, cfg, out_dir=tmp_path / "split")
    resumed_history = resumed.fit(resume=True)
    strip = lambda hs: [{k: v for k, v in h.items() if not k.endswith("_s")} for h in hs]  # noqa: E731
    assert strip(resumed_history) == strip(history)
    for name, idx in whole.loss_fn.regularizer.selections.items():
        assert torch.equal(resumed.loss_fn.regularizer.selections[name], idx), name
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    other = Trainer(fresh_model(), train, test, TrainConfig(**{**cfg.to_dict(), "sns_seed": 4}))
    other.fit()
    assert any(not torch.equal(other.loss_fn.regularizer.selections[n], idx)
               for n, idx in whole.loss_fn.regularizer.selections.items())


def test_all_neurons_is_the_mean_over_every_neuron_with_its_gradient():
    model = mnist_cnn().double()
    x, x_adv = (t.double() for t in pair())
    reg = SNSRegularizer(model, layers="all", k=0.1, lam=2.5, select="all")
    term = sns_term(reg, model, x, x_adv)
    grads = torch.autograd.grad(term, list(model.parameters()))
    names = ["conv1", "conv2", "fc1", "fc2"]
    _, got = outputs_by_hooks(model, torch.cat([x, x_adv]), names)
    by_hand = 2.5 * torch.stack([per_sample_l1(*got[n].chunk(2)).mean() for n in names]).mean()
    torch.testing.assert_close(term, by_hand)
    for g, h in zip(grads, torch.autograd.grad(by_hand, list(model.parameters()))):
        torch.testing.assert_close(g, h)
    assert {n: len(idx) for n, idx in reg.selections.items()} == {"conv1": 16, "conv2": 32, "fc1": 128, "fc2": 10}


def test_unknown_selection_fails():
    with pytest.raises(ValueError, match="select='best'"):
        SNSRegularizer(mnist_cnn(), select="best")


def test_the_train_command_keeps_a_preset_whole_and_checkpoints_the_random_draws(tmp_path):
    out = tmp_path / "run"
    main(["train", "--data", "synthetic-mnist", "--train-limit", "128", "--epochs", "1", "--batch-size", "64", "--steps", "1",
          "--eps", "0.1", "--eval-limit", "0", "--method", "sns", "--sns-layers", "hidden", "--sns-select", "random",
          "--sns-k", "2", "--sns-seed", "9", "--threads", "1", "--no-progress", "--out", str(out)])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["sns_layers"] == "hidden"
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):  # two batches, a draw per layer each
        expected = {name: torch.randperm(c, generator=gen)[:2].sort().values
                    for name, c in {"conv1": 16, "conv2": 32, "fc1": 128}.items()}
    assert set(state["loss_state"]["selections"]) == set(expected)
    for name, idx in expected.items():
        assert torch.equal(state["loss_state"]["selections"][name], idx), name
