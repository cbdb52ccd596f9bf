"""scripts/published_mnist.sh, shrunk to a trial run: the three runs train side by side, a second
call finds them finished, and bad arguments print the usage."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "published_mnist.sh"
MNIST = ROOT / "data" / "mnist"


def run(*args, env=None):
    env = dict(os.environ, PYTHON=sys.executable, NEUROSENS_DATA=str(ROOT / "data"), **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


def test_usage_errors(tmp_path):
    for args in ([], ["nope", str(tmp_path)], ["train"], ["train", str(tmp_path), "0"], ["train", str(tmp_path), "x"]):
        done = run(*args)
        assert done.returncode == 2 and "published_mnist.sh train OUT [MINUTES]" in done.stdout, args


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "train-images-idx3-ubyte").exists(),
                    reason="MNIST is not fetched (make test fetches it)")
def test_trial_run_trains_three_methods_and_resumes(tmp_path):
    trial = {"EPOCHS": "1", "EXTRA": "--train-limit 64 --eval-limit 16 --steps 2 --eval-steps 2 --threads 1"}
    done = run("train", str(tmp_path), "5", env=trial)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("pgd_at", "trades", "sns"):
        assert f"{name}: starting" in done.stdout and f"{name}: rc 0, 1 epochs done" in done.stdout, done.stdout
        assert (tmp_path / name / "model.pt").is_file()
        assert '"method": "trades"' in (tmp_path / "trades" / "config.json").read_text()
    again = run("train", str(tmp_path), "5", env=trial)
    assert again.returncode == 0 and again.stdout.count(": finished") == 3, again.stdout
