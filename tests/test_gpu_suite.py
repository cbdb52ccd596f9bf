"""benchmarks/gpu_suite.sh on the CPU: each phase's commands (dry run), one tarball and one
summary line per phase, and a failing step that does not stop the others."""
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"

EXPECTED = {
    "build": ["pip install -v --no-build-isolation --no-deps -e .", "FORCE_CUDA=1", "neurosens info", "-k reaches_python"],
    "checks": ["neurosens info", "-k reaches_python"],
    "test": ["tests/test_ops.py tests/test_kernel_edges.py", "not slow"],
    "sanitize": ["PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck", "--tool initcheck",
                 "--tool synccheck", "not gradcheck and not compile"],
    "bench": ["bench_ops.py --device cuda --large", "--dtype bfloat16 --memory-format channels_last --large-only",
              "--dtype float32 --memory-format channels_last --large-only", "bench_sns_step.py --device cuda --resnet-batch 256 --amp",
              "bench_measure.py --device cuda --images 8192", "profile_ops.py --device cuda"],
    "round": ["gpu_suite build: ok", "gpu_suite test: ok", "gpu_suite sanitize: ok", "gpu_suite bench: ok"],
}
# The tarballs each phase leaves: round runs every other phase, each leaving its own.
TARBALLS = {phase: [f"gpu_{phase}.tar.gz"] for phase in EXPECTED}
TARBALLS["round"] = sorted(f"gpu_{phase}.tar.gz" for phase in ("build", "test", "sanitize", "bench", "round"))


def run(*args, env=None):
    return subprocess.run([str(SUITE), *args], capture_output=True, text=True, env=env, timeout=120)


def logs_of(tarball):
    with tarfile.open(tarball) as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


@pytest.mark.parametrize("phase", sorted(EXPECTED))
def test_dry_run_of_each_phase(phase, tmp_path):
    done = run("--dry-run", phase, str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(tmp_path)) == TARBALLS[phase]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"gpu_suite {phase}: ok") and last.endswith(f"gpu_{phase}.tar.gz"), last
    logs = logs_of(tmp_path / f"gpu_{phase}.tar.gz")
    assert logs["summary.txt"].startswith(f"phase {phase}: ok")
    commands = "\n".join(text for name, text in logs.items() if name.endswith(".log"))
    for fragment in EXPECTED[phase]:
        assert fragment in commands, (fragment, commands)


def test_failing_steps_do_not_stop_the_others(tmp_path):
    # A python that fails and no CUDA toolkit: every step fails, each is still run and reported.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 3\n")
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:/usr/bin:/bin", CUDA_HOME=str(tmp_path / "no-cuda"), PYTHON=str(fake / "python3"))
    out = tmp_path / "out"
    done = run("sanitize", str(out), env=env)
    assert done.returncode != 0
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_suite sanitize: FAILED")
    for name in ("environment (rc 3)", "compute-sanitizer missing", "memcheck", "initcheck", "synccheck"):
        assert name in last, last
    assert os.listdir(out) == ["gpu_sanitize.tar.gz"]


def test_usage_errors():
    assert run("nope", "/tmp").returncode == 2
    assert run("build").returncode == 2
