"""A training process killed with SIGKILL at seeded random points (mid-epoch, mid-checkpoint-write)
resumes to exactly the weights of an uninterrupted run, and leaves no debris."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurosens.training import Trainer, TrainConfig

from conftest import digits8, fresh_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONFIG = dict(method="pgd_at", epochs=3, batch_size=64, optimizer="sgd", lr=0.05, eps=0.1, steps=2, eval_steps=2,
              eval_limit=64, progress=False)
LIMIT = 256  # 4 batches per epoch

# Run in a child process: train, and SIGKILL itself at batch N ("batch") or halfway through writing
# the N-th checkpoint file ("write").
CHILD = """
import io, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import neurosens.checkpoint as checkpoint
from neurosens.training import Trainer, TrainConfig
from conftest import digits8, fresh_model

out, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]

def kill_now():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "write":
    real_save = torch.save
    def half_save(obj, path):
        calls[0] += 1
        if calls[0] < n:
            return real_save(obj, path)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        kill_now()
    checkpoint.torch.save = half_save

train, test = digits8({limit})
trainer = Trainer(fresh_model(), train, test, TrainConfig(**{config!r}), out_dir=out)
if mode == "batch":
    loss = trainer.loss_fn
    def counting(*args):
        calls[0] += 1
        if calls[0] == n:
            kill_now()
        return loss(*args)
    trainer.loss_fn = counting
trainer.fit(resume=True)
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    train, test = digits8(LIMIT)
    trainer = Trainer(fresh_model(), train, test, TrainConfig(**CONFIG), out_dir=tmp_path_factory.mktemp("whole"))
    history = trainer.fit()
    return trainer.model.state_dict(), history


def kill_at(out, mode, n):
    script = CHILD.format(tests=str(Path(__file__).parent), limit=LIMIT, config=CONFIG)
    child = subprocess.run([sys.executable, "-c", script, str(out), mode, str(n)], capture_output=True, text=True,
                           timeout=120, env=os.environ | {"NEUROSENS_KEEP_FREED_MEMORY": "0"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def points(seed):
    rng = random.Random(seed)
    return [("batch", rng.randint(2, 11)), ("write", rng.randint(1, 2)), ("write", 3)]


@pytest.mark.parametrize("mode, n", points(2024))
def test_killed_run_resumes_bit_identically(tmp_path, uninterrupted, mode, n):
    weights, history = uninterrupted
    kill_at(tmp_path, mode, n)
    if mode == "write":
        assert list(tmp_path.glob(".*.tmp*")), "the kill left no half-written file"
    if (tmp_path / "checkpoint.pt").exists():
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines() if (tmp_path / "metrics.jsonl").exists() else []
        assert len(lines) <= state["epoch"]  # never an epoch the checkpoint lacks
    train, test = digits8(LIMIT)
    resumed = Trainer(fresh_model(), train, test, TrainConfig(**CONFIG), out_dir=tmp_path)
    resumed_history = resumed.fit(resume=True)
    for name, value in weights.items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    strip = [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]
    assert [{k: v for k, v in h.items() if not k.endswith("_s")} for h in resumed_history] == strip
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp*"))
