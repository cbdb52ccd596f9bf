"""Sensitivity while training: the monitor's records against independent measurements, its
intervals, what a measurement leaves untouched, the Trainer's records across a resume, and the
command line's checks."""
import json
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

import neurosens as ns
from neurosens.cli import main
from neurosens.env import MissingDependency
from neurosens.monitor import SensitivityMonitor, parse_every
from neurosens.plots import plot_monitor
from neurosens.training import Trainer, TrainConfig

from conftest import digits8, fresh_model

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_dropout_model(seed=0):
    """A model whose train and eval modes compute differently (BatchNorm, Dropout)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(6 * 6 * 6, 10))


def probe(n=40):
    _, test = digits8()
    return test.first(n).tensors()


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_record_equals_an_independent_measurement():
    model = bn_dropout_model().train()
    x, y = probe(40)
    attack = ns.PGD(model, eps=0.1, steps=3)
    monitor = SensitivityMonitor(model, (x, y), attack, every=None, batch_size=16, seed=7)
    record = monitor.measure()

    # The same adversarial probe, crafted by hand: seed 7, then the batches of 16 in order.
    model.eval()
    torch.manual_seed(7)
    x_adv = torch.cat([attack(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)])
    report = ns.measure(model, [(x, x_adv, y)], progress=False)
    for layer, value in report.layer_means().items():
        assert record["sensitivity"][layer] == pytest.approx(value, rel=1e-6)
    assert list(record["sensitivity"]) == ["0", "5"]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
        robust = (model(x_adv).argmax(1) == y).double().mean().item()
    assert record["clean"] == pytest.approx(clean) and record["robust"] == pytest.approx(robust)
    assert record["robust"] < record["clean"] or record["clean"] == 0
    assert record["samples"] == 40 and record["step"] == 0 and record["epoch"] == 0


def test_attack_by_name_and_loader_probe_match_the_object_and_tensors():
    model = fresh_model()
    x, y = probe(24)
    by_object = SensitivityMonitor(model, (x, y), ns.PGD(model, eps=0.1, steps=2), every=None).measure()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    by_name = SensitivityMonitor(model, loader, "pgd", eps=0.1, steps=2, every=None).measure()
    assert without_seconds([by_name]) == without_seconds([by_object])


def test_the_model_mode_rng_and_weights_are_untouched():
    model = bn_dropout_model().train()
    model[1].eval()  # a frozen BatchNorm in a training model keeps its own mode
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = SensitivityMonitor(model, probe(32), "pgd", eps=0.1, steps=2, every=None)

    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    expected = (torch.rand(4), np.random.rand(), random.random())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    first = monitor.measure()
    assert torch.equal(torch.rand(4), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # running stats too
    assert all(p.grad is None for p in model.parameters())
    # A fixed attack seed: the same model gives the same record.
    assert without_seconds([monitor.measure()]) == without_seconds([first])


def test_intervals():
    model = fresh_model()
    monitor = SensitivityMonitor(model, probe(8), "fgsm", eps=0.1, every=(3, "epoch"))
    for epoch in range(2):
        for _ in range(4):
            monitor.step()
        monitor.epoch_end()
    # Steps 3 and 6 by count, 4 and 8 at the epoch ends; step 8 is not measured twice.
    assert [(r["step"], r["epoch"]) for r in monitor.history] == [(3, 1), (4, 1), (6, 2), (8, 2)]

    steps_only = SensitivityMonitor(model, probe(8), "fgsm", eps=0.1, every=4)
    epochs_only = SensitivityMonitor(model, probe(8), "fgsm", eps=0.1, every="epoch")
    for m in (steps_only, epochs_only):
        for _ in range(6):
            m.step()
        m.epoch_end()
    assert [r["step"] for r in steps_only.history] == [4]
    assert [(r["step"], r["epoch"]) for r in epochs_only.history] == [(6, 1)]
    epochs_only.measure()  # by hand, right after an epoch end: that epoch's
    epochs_only.step()
    epochs_only.measure()  # after a step of the next epoch: the next one's
    assert [r["epoch"] for r in epochs_only.history] == [1, 1, 2]


@pytest.mark.parametrize("every", [0, -2, True, "epochs", (3, 4), ("epoch", "epoch"), 2.5])
def test_bad_intervals_are_one_line_errors(every):
    with pytest.raises(ValueError, match="every=") as err:
        parse_every(every)
    assert "\n" not in str(err.value)


def test_bad_arguments():
    model = fresh_model()
    x, y = probe(8)
    with pytest.raises(ValueError, match="needs its budget eps="):
        SensitivityMonitor(model, (x, y), "pgd")
    with pytest.raises(ValueError, match="attack 'pgdd' is unknown"):
        SensitivityMonitor(model, (x, y), "pgdd", eps=0.1)
    with pytest.raises(ValueError, match="bound to another model"):
        SensitivityMonitor(model, (x, y), ns.PGD(fresh_model(1), eps=0.1))
    with pytest.raises(ValueError, match=r"labels \[N\]"):
        SensitivityMonitor(model, (x, y[:4]), "fgsm", eps=0.1)
    with pytest.raises(TypeError, match="probe must be"):
        SensitivityMonitor(model, x, "fgsm", eps=0.1)
    with pytest.raises(ValueError, match="layer"):
        SensitivityMonitor(model, (x, y), "fgsm", eps=0.1, layers=["nope"])


def test_writer_gets_every_record_and_plot_draws_them(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    model = fresh_model()
    writer = Writer()
    monitor = SensitivityMonitor(model, probe(8), "fgsm", eps=0.1, every=1, writer=writer)
    monitor.step()
    monitor.step()
    r = monitor.history[-1]
    assert ("probe/robust_accuracy", r["robust"], 2) in writer.scalars
    assert ("sensitivity/fc2", r["sensitivity"]["fc2"], 2) in writer.scalars
    assert len(writer.scalars) == 2 * (2 + len(r["sensitivity"]))
    fig = monitor.plot(tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0 and len(fig.axes[0].lines) == len(r["sensitivity"])
    fig = plot_monitor({"a": monitor.history, "b": monitor.history[:1]}, path=tmp_path / "two.png")
    assert sum(ax.get_visible() for ax in fig.axes) == len(r["sensitivity"]) + 1
    with pytest.raises(ValueError, match="no monitor records"):
        plot_monitor({"a": []})


def test_missing_tensorboard_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    train, test = digits8(64)
    cfg = TrainConfig(method="standard", epochs=1, batch_size=32, monitor=8, monitor_tensorboard=True, progress=False)
    with pytest.raises(MissingDependency, match=r"needs the optional package tensorboard.*pip install tensorboard"):
        Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path)


def run_config(**overrides):
    base = dict(method="pgd_at", epochs=2, batch_size=64, optimizer="adam", lr=3e-3, eps=0.1, steps=2, eval_steps=2,
                eval_limit=0, progress=False, monitor=24, monitor_every=2)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.slow
def test_trainer_records_survive_resume_and_leave_training_alone(tmp_path):
    train, test = digits8(256)  # 4 steps per epoch
    whole = Trainer(fresh_model(), train, test, run_config(), out_dir=tmp_path / "whole")
    history = whole.fit()
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [[r["step"] for r in line["monitor"]] for line in lines]
    assert steps == [[0, 2, 4], [6, 8]]
    assert [[r["epoch"] for r in line["monitor"]] for line in lines] == [[0, 1, 1], [2, 2]]
    assert (tmp_path / "whole" / "monitor.png").is_file()
    page = (tmp_path / "whole" / "report.html").read_text()
    assert "Sensitivity while training" in page and "data:image/png;base64," in page

    # The last record is the final model measured by hand.
    last = whole.monitor.history[-1]
    check = SensitivityMonitor(whole.model, test.first(24).tensors(), ns.PGD(whole.model, 0.1, steps=2), every=None,
                               batch_size=64, seed=0).measure()
    assert without_seconds([check])[0] | {"step": 8, "epoch": 2} == without_seconds([last])[0]

    # The same weights as a run without the monitor.
    plain = Trainer(fresh_model(), train, test, run_config(monitor=0, monitor_every=0), out_dir=tmp_path / "plain")
    plain.fit()
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in whole.model.state_dict().items())

    # Stopped after epoch 1, with a record of epoch 2 measured and lost, then resumed: the same records.
    first = Trainer(fresh_model(), train, test, run_config(), out_dir=tmp_path / "resumed")
    first.fit(until=1)
    first.monitor.step()
    first.monitor.step()
    resumed = Trainer(fresh_model(5), train, test, run_config(), out_dir=tmp_path / "resumed")
    resumed_history = resumed.fit(resume=True)
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [without_seconds(line["monitor"]) for line in again] == [without_seconds(line["monitor"]) for line in lines]
    assert without_seconds(resumed.monitor.history) == without_seconds(whole.monitor.history)
    assert len(resumed_history) == len(history) == 2


def test_config_checks():
    with pytest.raises(ValueError, match="monitor_every=5 needs monitor > 0"):
        TrainConfig(monitor_every=5)
    with pytest.raises(ValueError, match="monitor=-1: must be >= 0"):
        TrainConfig(monitor=-1)
    with pytest.raises(ValueError, match="monitor_steps=0"):
        TrainConfig(monitor=8, monitor_steps=0)
    train, test = digits8(64)
    with pytest.raises(ValueError, match="the test set has only 297 images"):
        Trainer(fresh_model(), train, test, TrainConfig(monitor=1000, progress=False))
    with pytest.raises(ValueError, match="probes the evaluation images, and this run has none"):
        Trainer(fresh_model(), train, None, TrainConfig(monitor=10, progress=False))


TRAIN = ["train", "--data", "digits8", "--width", "8", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--monitor", "-3"], "--monitor: must be an integer >= 0, got -3"),
    (["--monitor-every", "x"], "--monitor-every: not an integer: 'x'"),
    (["--monitor-every", "10"], "monitor_every=10 needs monitor > 0"),
    (["--monitor-steps", "4"], "monitor_steps=4 needs monitor > 0"),
    (["--monitor", "5000"], "monitor=5000: the test set has only 297 images"),
])
def test_cli_errors_are_one_line(capsys, tmp_path, extra, message):
    try:
        code = main(TRAIN + extra + ["--out", str(tmp_path / "run")])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err + (code + "\n" if isinstance(code, str) else "")
    assert code not in (0, None)
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_tensorboard_missing_is_one_line_before_data(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as exit:
        main(TRAIN + ["--data", "mnist", "--root", str(tmp_path / "nowhere"), "--monitor", "8", "--monitor-tensorboard",
                      "--out", str(tmp_path / "run")])
    assert str(exit.value) == ("neurosens train: TensorBoard logging needs the optional package tensorboard, which is "
                               "not installed (pip install tensorboard)")


def _ddp_worker(rank, world, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        model = fresh_model()
        record = SensitivityMonitor(model, probe(30), "fgsm", eps=0.1, every=None, batch_size=8).measure()
        torch.save(record, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_probe_and_agree_with_one_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))
    alone = SensitivityMonitor(fresh_model(), probe(30), "fgsm", eps=0.1, every=None, batch_size=8).measure()
    assert without_seconds([r0]) == without_seconds([r1])
    assert r0["samples"] == 30 and r0["clean"] == alone["clean"] and r0["robust"] == alone["robust"]
    for layer, value in alone["sensitivity"].items():
        assert r0["sensitivity"][layer] == pytest.approx(value, rel=1e-6)


def test_resume_of_a_run_older_than_the_monitor_options(tmp_path):
    from neurosens.checkpoint import load_checkpoint, save_checkpoint

    train, test = digits8(64)
    cfg = run_config(method="standard", monitor=0, monitor_every=0, epochs=2)
    Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path).fit(until=1)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("monitor")}
    save_checkpoint({k: v for k, v in state.items() if k != "digest"}, tmp_path / "checkpoint.pt")
    assert len(Trainer(fresh_model(), train, test, cfg, out_dir=tmp_path).fit(resume=True)) == 2
    # Turning the monitor on halfway would leave its records without their first epoch.
    with pytest.raises(ValueError, match="monitor: 0 -> 8"):
        Trainer(fresh_model(), train, test, run_config(method="standard", monitor=8, monitor_every=0, epochs=2),
                out_dir=tmp_path).fit(resume=True)
