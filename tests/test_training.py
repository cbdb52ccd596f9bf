import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neurosens import data, training
from neurosens.attacks import PGD
from neurosens.checkpoint import load_model
from neurosens.cli import main as cli_main
from neurosens.evaluation import evaluate
from neurosens.methods import METHODS, make_loss
from neurosens.training import Trainer, TrainConfig

from conftest import SPEC, digits8, fresh_model

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    base = dict(method="pgd_at", epochs=3, batch_size=64, optimizer="sgd", lr=0.05, eps=0.1, steps=3, eval_steps=3,
                eval_limit=100, progress=False)
    return TrainConfig(**{**base, **overrides})


def without_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]


def test_standard_training_learns_digits(tmp_path):
    train, test = digits8()
    cfg = config(method="standard", epochs=8, optimizer="adam", lr=5e-3, weight_decay=0, eval_limit=297)
    history = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path, meta={"model": SPEC}).fit()
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["test_clean"] > 0.9 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_n"] == 297 and 0 <= history[-1]["test_pgd"] < history[-1]["test_clean"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert without_times(lines) == without_times(history)


@pytest.mark.slow
def test_adversarial_training_buys_robustness():
    train, test = digits8()
    xt, yt = test.tensors()
    robust = {}
    for method in ("standard", "pgd_at", "trades"):
        model = fresh_model()
        cfg = config(method=method, epochs=6, optimizer="adam", lr=3e-3, weight_decay=0, eps=0.15, steps=5, eval_limit=0)
        Trainer(model, train, test, cfg).fit()
        # The trainer moves the model to the GPU when there is one.
        device = next(model.parameters()).device
        x, y = xt.to(device), yt.to(device)
        torch.manual_seed(0)
        x_adv = PGD(model, 0.15, steps=20)(x, y)
        with torch.no_grad():
            robust[method] = (model(x_adv).argmax(1) == y).float().mean().item()
    assert robust["pgd_at"] > robust["standard"] + 0.2, robust
    assert robust["trades"] > robust["standard"] + 0.2, robust


def test_resumed_run_is_bit_identical(tmp_path):
    train, test = digits8(400)
    cfg = config(method="trades", schedule="step", milestones=(0.4,), eps_warmup=1.5)
    full = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "full")
    full_history = full.fit()

    first = Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path / "cut")
    first.fit(until=1)
    torch.manual_seed(12345)  # whatever happens between the runs must not matter
    torch.rand(10)
    resumed = Trainer(fresh_model(seed=7), train, test, cfg, out_dir=tmp_path / "cut")
    history = resumed.fit(resume=True)

    assert resumed.epoch == 3 and len(history) == 3
    assert without_times(history) == without_times(full_history)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    for a, b in zip(full.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_checkpoints_load_with_weights_only_and_no_temp_files(tmp_path):
    train, test = digits8(200)
    trainer = Trainer(fresh_model(), train, test, config(epochs=1), out_dir=tmp_path, meta={"model": SPEC, "data": "digits8"})
    trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["method"] == "pgd_at" and len(state["rng"]) == 1
    model = load_model(tmp_path / "model.pt")
    # The trainer runs on the GPU when there is one; the loaded model is on the host, so both are
    # compared there (a GPU forward may round differently).
    trained = trainer.model.cpu().eval()
    assert model.state_dict().keys() == trained.state_dict().keys()
    for (name, saved), (_, kept) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(saved, kept), f"{name} differs in model.pt"
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def test_schedules_and_eps_warmup():
    train, _ = digits8(128)
    for schedule, expected in [("cosine", 0.0), ("step", 0.05 * 0.01), ("constant", 0.05)]:
        trainer = Trainer(fresh_model(), train, None, config(method="standard", epochs=2, schedule=schedule))
        trainer.fit()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), schedule
    trainer = Trainer(fresh_model(), train, None, config(epochs=2, eps_warmup=2.0))
    history = trainer.fit()
    assert history[0]["train_eps"] == pytest.approx(0.05) and history[1]["train_eps"] == pytest.approx(0.1)


def test_evaluate_reports_clean_and_robust_accuracy():
    train, test = digits8()
    model = fresh_model()
    Trainer(model, train, None, config(method="standard", epochs=8, optimizer="adam", lr=5e-3, weight_decay=0)).fit()
    model.train()
    loader = data.make_loader(test, 100)
    result = evaluate(model, loader, {"pgd": PGD(model, 0.3, steps=10)})
    assert model.training, "evaluate must restore the model's mode"
    assert result["n"] == 297 and result["clean"] > 0.85 and result["pgd"] < 0.2


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "mart"}, "method='mart' is unknown"),
    ({"optimizer": "lion"}, "optimizer='lion' is unknown"),
    ({"schedule": "linear"}, "schedule='linear' is unknown"),
    ({"epochs": 0}, "epochs=0: must be >= 1"),
    ({"eps": -1.0}, "eps=-1.0"),
])
def test_bad_config_raises_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_methods_share_one_loss_interface():
    model = fresh_model()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    attack = PGD(model, 0.1, steps=2)
    for name in METHODS:
        loss, logs = make_loss(name, model=model)(model, x, y, attack)
        assert loss.dim() == 0 and loss.requires_grad and all(v.dim() == 0 for v in logs.values()), name
    with pytest.raises(ValueError, match="beta=-1"):
        make_loss("trades", beta=-1)
    with pytest.raises(ValueError, match="method='mart' is unknown"):
        make_loss("mart")


def _ddp_worker(rank, world, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        train, test = digits8(512)
        trainer = Trainer(fresh_model(seed=rank), train, test, config(method="trades", epochs=2, eval_limit=100), out_dir=out)
        history = trainer.fit()
        torch.save({"model": trainer.model.state_dict(), "history": history}, f"{out}/rank{rank}.pt")
        # Rank 0 writes the checkpoint after the last collective: both ranks let go of the trainer
        # (its DDP reducer holds the group) and meet, so neither tears the group down while the
        # other still uses it.
        del trainer
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_identical_replicas(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))
    for name, a in r0["model"].items():
        assert torch.equal(a, r1["model"][name]), f"replicas differ at {name}"
    init = fresh_model(seed=0).state_dict()
    assert not torch.equal(init["conv1.weight"], r0["model"]["conv1.weight"]), "training did not move the weights"
    assert without_times(r0["history"]) == without_times(r1["history"]), "metrics are all-reduced, so ranks agree"
    assert r0["history"][-1]["test_n"] == 100 and r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_cli_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--data", "digits8", "--arch", "small-cnn", "--width", "8", "--method", "standard",
                     "--epochs", "5", "--optimizer", "adam", "--lr", "0.005", "--eps", "0.1", "--eval-steps", "2",
                     "--eval-limit", "50", "--no-progress", "--out", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epoch"] == 5
    report = tmp_path / "eval.json"
    assert cli_main(["eval", str(run / "model.pt"), "--eps", "0.1", "--attacks", "clean,fgsm,pgd,cw", "--steps", "5",
                     "-n", "100", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "pgd-5" in table and "cw-5" in table
    results = json.loads(report.read_text())
    assert results["data"] == "digits8" and results["n"] == 100
    accs = {k: v["accuracy"] for k, v in results["results"].items()}
    assert set(accs) == {"clean", "fgsm", "pgd-5", "cw-5"} and accs["clean"] > 0.8 and accs["pgd-5"] < accs["clean"]
    assert results["results"]["pgd-5"]["alpha"] == pytest.approx(2.5 * 0.1 / 5)  # the default step, recorded
    # Resuming a finished run trains no further epoch.
    metrics = (run / "metrics.jsonl").read_text()
    assert cli_main(["train", "--data", "digits8", "--arch", "small-cnn", "--width", "8", "--method", "standard",
                     "--epochs", "5", "--optimizer", "adam", "--lr", "0.005", "--eps", "0.1", "--no-progress",
                     "--out", str(run), "--resume"]) == 0
    assert (run / "metrics.jsonl").read_text() == metrics


def test_cli_overwrite_starts_a_run_over_and_leaves_nothing_of_the_old_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "monitor.png", "report.html"):
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")
    assert cli_main(["train", "--data", "digits8", "--width", "8", "--method", "standard", "--epochs", "1",
                     "--eval-limit", "0", "--train-limit", "128", "--no-progress", "--out", str(run), "--overwrite"]) == 0
    assert not (run / "monitor.png").exists() and not (run / "report.html").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and (run / "model.pt").is_file()
    assert (run / "notes.txt").read_text() == "mine"


def test_cli_val_evaluates_on_held_out_training_images(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "digits8", "--width", "8", "--epochs", "1", "--optimizer", "adam", "--lr", "0.005",
            "--eps", "0.1", "--eval-steps", "2", "--val", "100", "--train-limit", "300", "--no-progress", "--out", str(run)]
    assert cli_main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["val_n"] == 100 and "test_n" not in last and {"val_clean", "val_pgd"} <= set(last)
    assert torch.load(run / "model.pt", weights_only=True)["meta"]["val"] == 100
    # The reported clean accuracy is the model's on exactly the held-out images (seed 0 by default).
    _, held = data.digits(True, size=8).split(100, seed=0)
    net = load_model(run / "model.pt")
    with torch.no_grad():
        acc = (net.eval()(held.tensors()[0]).argmax(1) == held.labels).float().mean().item()
    assert abs(last["val_clean"] - acc) < 1e-6
    # Another validation size is another run.
    with pytest.raises(SystemExit, match="meta.val: 100 -> 50"):
        cli_main(args[:-2] + ["--out", str(run), "--resume"] + ["--val", "50"])


def test_cli_data_fetch_reports_failure(tmp_path):
    with pytest.raises(SystemExit, match=r"^neurosens data: could not fetch fashion-mnist: .* dataset-fashion-mnist"):
        cli_main(["data", "fetch", "fashion-mnist", "--root", str(tmp_path), "--source", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"could not fetch mnist: .*nowhere.tgz: no such archive or folder"):
        cli_main(["data", "fetch", "mnist", "--root", str(tmp_path), "--source", str(tmp_path / "nowhere.tgz")])
    (tmp_path / "random.tgz").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit, match=r"could not fetch mnist: ") as err:
        cli_main(["data", "fetch", "mnist", "--root", str(tmp_path), "--source", str(tmp_path / "random.tgz")])
    assert "\n" not in str(err.value)


def test_world_size_mismatch_is_refused(tmp_path):
    train, test = digits8(128)
    trainer = Trainer(fresh_model(), train, test, config(epochs=1, eval_limit=0), out_dir=tmp_path)
    trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["world_size"] = 4
    with pytest.raises(ValueError, match="written by 4 processes"):
        training.Trainer(fresh_model(), train, test, config(epochs=1)).load_state_dict(state)


class InputRecorder(torch.nn.Module):
    """A linear-softmax-like net that keeps the inputs of its training-mode forwards (the attack
    runs it in eval mode, so only the loss's own forwards are kept)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def test_trades_loss_is_ce_plus_beta_times_a_hand_written_kl():
    model = InputRecorder().double().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=gen)
    eps, beta = 0.1, 3.0
    torch.manual_seed(0)  # the inner attack's random start
    loss, logs = make_loss("trades", beta=beta)(model, x, y, PGD(model, eps, alpha=0.03, steps=5))
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert len(model.seen) == 2 and torch.equal(model.seen[0], x)
    x_adv = model.seen[1]
    assert (x_adv - x).abs().max() <= eps + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1

    def log_probs(inputs):
        z = model.net(inputs)
        return z - z.exp().sum(1, keepdim=True).log()

    lp, lq = log_probs(x), log_probs(x_adv)
    ce = -lp.gather(1, y[:, None]).mean()
    kl = (lp.exp() * (lp - lq)).sum(1).mean()  # KL(f(x) || f(x')), summed over classes, mean over the batch
    expected = ce + beta * kl
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["kl"], kl.detach())
    for g, e in zip(got, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(g, e)
    # The inner attack maximizes that KL: x' beats the point it started near and random points of the ball.
    with torch.no_grad():
        noise = (x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1)).clamp(0, 1)
        kl_noise = (lp.exp() * (lp - log_probs(noise))).sum(1).mean()
    assert kl > 2 * kl_noise > 0
