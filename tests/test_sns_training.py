"""SNS as a training method: equivalences, gradients, option checks, resume and DDP."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from neurosens import reference
from neurosens.methods import SNSLoss
from neurosens.training import Trainer, TrainConfig

from conftest import digits8, fresh_model

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    base = dict(method="sns", epochs=2, batch_size=64, optimizer="sgd", lr=0.05, eps=0.1, steps=3, eval_steps=3,
                eval_limit=64, progress=False)
    return TrainConfig(**{**base, **overrides})


def without_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]


def test_lam_zero_trains_exactly_like_pgd_at():
    train, test = digits8(256)
    runs = {}
    for name, cfg in {"pgd_at": config(method="pgd_at"), "sns": config(sns_lam=0.0)}.items():
        trainer = Trainer(fresh_model(), train, test, cfg)
        runs[name] = (trainer.fit(), trainer.model.state_dict())
    assert without_times(runs["sns"][0]) == without_times(runs["pgd_at"][0])
    for key, value in runs["pgd_at"][1].items():
        assert torch.equal(runs["sns"][1][key], value), key


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_step_gradient_is_adversarial_ce_plus_the_reference_term(metric):
    model = fresh_model(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(12, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.rand(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    y = torch.randint(0, 10, (12,), generator=gen)
    lam, k = 0.7, 0.25
    loss_fn = SNSLoss(model, layers=["conv2", "fc1"], k=k, lam=lam, metric=metric, clean_weight=0.5)
    loss, logs = loss_fn(model, x, y, lambda inputs, labels: x_adv)
    got = torch.autograd.grad(loss, list(model.parameters()))

    acts = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o))
             for n in ("conv2", "fc1")]
    logits, logits_adv = model(x), model(x_adv)
    for h in hooks:
        h.remove()
    terms = [reference.stabilize(a, b, k=max(1, math.floor(k * a.shape[1] + 0.5)), metric=metric, select_metric="l1")[0]
             for a, b in acts.values()]
    expected_loss = F.cross_entropy(logits_adv, y) + lam * torch.stack(terms).mean() + 0.5 * F.cross_entropy(logits, y)
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert set(logs) == {"acc", "adv_acc", "ce", "sns", "clean_ce"}


def test_correct_examples_only_masks_the_adversarial_ce():
    model = fresh_model(dtype=torch.float64)
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    x_adv = (x + 0.05).clamp(0, 1)
    y = torch.randint(0, 10, (16,))
    loss_fn = SNSLoss(model, layers=["fc1"], k=2, lam=0.0, adv_examples="correct")
    loss, logs = loss_fn(model, x, y, lambda inputs, labels: x_adv)
    with torch.no_grad():
        right = (model(x).argmax(1) == y).double()
        expected = (F.cross_entropy(model(x_adv), y, reduction="none") * right).mean()
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("overrides, error, message", [
    ({"sns_layers": ["conv9"]}, ValueError, "conv9"),
    ({"sns_layers": ["fc2"], "sns_k": 11}, ValueError, "fc2"),
    ({"sns_metric": "linf"}, ValueError, "linf"),
    ({"sns_k": 1.5}, ValueError, "k=1.5"),
    ({"sns_adv_examples": "some"}, ValueError, "adv_examples='some'"),
    ({"sns_clean_weight": -1.0}, ValueError, "clean_weight=-1.0"),
])
def test_bad_options_fail_before_training(overrides, error, message, tmp_path):
    train, test = digits8(64)
    with pytest.raises(error, match=message):
        Trainer(fresh_model(), train, test, config(**overrides), out_dir=tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_bad_refresh_fails_in_the_config():
    with pytest.raises(ValueError, match="sns_refresh=0"):
        config(sns_refresh=0)


def test_selection_is_deterministic_for_a_seed_and_resume_is_exact(tmp_path):
    train, test = digits8(256)
    cfg = config(epochs=3, sns_refresh=3, sns_layers=["conv2", "fc1"])
    whole = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "whole")
    history = whole.fit()
    again = Trainer(fresh_model(), train, test, cfg)
    again.fit()
    for name, idx in whole.loss_fn.regularizer.selections.items():
        assert torch.equal(again.loss_fn.regularizer.selections[name], idx), name
    first = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "split")
    first.fit(until=1)
    resumed = Trainer(fresh_model(seed=5), train, test, cfg, out_dir=tmp_path / "split")
    assert without_times(resumed.fit(resume=True)) == without_times(history)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.loss_fn.regularizer._calls == whole.loss_fn.regularizer._calls == 3 * 4


def _ddp_worker(rank, world, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        train, test = digits8(256)
        trainer = Trainer(fresh_model(seed=rank), train, test, config(sns_layers=["conv1", "fc1"], sns_k=0.25))
        picks = []
        loss_fn = trainer.loss_fn

        def recording(*args):
            result = loss_fn(*args)
            picks.append({n: idx.clone() for n, idx in loss_fn.regularizer.selections.items()})
            return result

        trainer.loss_fn = recording
        trainer.fit()
        torch.save({"model": trainer.model.state_dict(), "picks": picks}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_select_the_same_neurons_and_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))
    assert len(r0["picks"]) == len(r1["picks"]) == 2 * 4  # 2 epochs of 128 images per rank, 32 per batch
    for p0, p1 in zip(r0["picks"], r1["picks"]):
        for name in p0:
            assert torch.equal(p0[name], p1[name]), name
    # Each rank sees its own shard, so only an all-reduce before top-k makes the picks agree;
    # the selections also change over training.
    assert any(not torch.equal(r0["picks"][0][n], r0["picks"][-1][n]) for n in r0["picks"][0])
    for key, value in r0["model"].items():
        assert torch.equal(r1["model"][key], value), key


def l1_per_neuron(a, b):
    """[N, C] mean absolute difference of each neuron's map, from the definition."""
    return (a - b).abs().flatten(2).mean(2) if a.dim() > 2 else (a - b).abs()


def test_default_sns_step_is_ce_plus_lam_times_a_hand_written_l1_term():
    model = fresh_model(dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(10, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    y = torch.randint(0, 10, (10,), generator=gen)
    loss, _ = SNSLoss(model, layers=["conv1", "conv2", "fc1"], lam=1.5)(model, x, y, lambda inputs, labels: x_adv)
    got = torch.autograd.grad(loss, list(model.parameters()))

    acts = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o))
             for n in ("conv1", "conv2", "fc1")]
    model(x)
    logits_adv = model(x_adv)
    for h in hooks:
        h.remove()
    terms = []
    for a, b in acts.values():
        dist_each = l1_per_neuron(a, b)
        k = math.floor(0.3 * a.shape[1] + 0.5)
        picked = dist_each.detach().mean(0).argsort(descending=True)[:k]
        terms.append(dist_each[:, picked].mean())
    expected = F.cross_entropy(logits_adv, y) + 1.5 * sum(terms) / 3
    torch.testing.assert_close(loss, expected)
    for g, e in zip(got, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(g, e)


DDP_LAYERS = ("conv1", "conv2", "fc1")


def ddp_batch():
    """16 images split into two shards; each shard perturbed along its own pattern, so the shards
    alone rank the neurons differently from the whole batch."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    patterns = torch.randn(2, 1, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_adv = x + 0.3 * torch.cat([patterns[0].expand(8, -1, -1, -1), patterns[1].expand(8, -1, -1, -1)])
    return x, x_adv


def _ddp_selection_worker(rank, world, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        from neurosens.sns import SNSRegularizer

        model = fresh_model(dtype=torch.float64)
        x, x_adv = (t[8 * rank: 8 * rank + 8] for t in ddp_batch())
        reg = SNSRegularizer(model, layers=list(DDP_LAYERS), k=0.25)
        with reg.capture():
            model(x)
            model(x_adv)
        loss = reg.loss()
        torch.save({"selections": reg.selections, "loss": loss.detach()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_selection_is_the_top_k_of_the_whole_batch(tmp_path):
    mp.spawn(_ddp_selection_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = fresh_model(dtype=torch.float64)
    x, x_adv = ddp_batch()
    acts = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o))
             for n in DDP_LAYERS]
    with torch.no_grad():
        model(x)
        model(x_adv)
    for h in hooks:
        h.remove()
    shard_differs = False
    for rank, result in enumerate(ranks):
        terms = []
        for name in DDP_LAYERS:
            a, b = acts[name]
            dist_each = l1_per_neuron(a, b)
            k = math.floor(0.25 * a.shape[1] + 0.5)
            whole = dist_each.mean(0).sort(descending=True)
            assert whole.values[k - 1] - whole.values[k] > 1e-9, "no tie at the k-th neuron"
            expected = whole.indices[:k]
            assert torch.equal(result["selections"][name], expected), (rank, name)
            shard = dist_each[8 * rank: 8 * rank + 8]
            shard_differs |= set(shard.mean(0).argsort(descending=True)[:k].tolist()) != set(expected.tolist())
            terms.append(shard[:, expected].mean())
        # Each rank stabilizes its own shard on the shared neurons.
        torch.testing.assert_close(result["loss"], sum(terms) / len(terms))
    assert shard_differs, "the test must pick shards whose own top-k differs from the whole batch's"
