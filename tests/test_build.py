"""The build: which extension is loaded, and which GPU architectures and flags setup.py picks."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neurosens import extension

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def test_the_extension_the_build_asked_for_is_loaded():
    """CI sets NEUROSENS_EXPECT_EXT (cpu or cuda): a build that lost its extension must fail, since
    every fused-versus-reference test would otherwise skip."""
    want = os.environ.get("NEUROSENS_EXPECT_EXT")
    if not want:
        pytest.skip("NEUROSENS_EXPECT_EXT is not set (make test and CI set it)")
    assert want in ("cpu", "cuda"), want
    ext = extension.EXTENSION
    assert ext is not None, f"the extension is not loaded: {extension.WHY_NOT}"
    assert ext.with_cuda == (want == "cuda"), f"expected the {want} build, got with_cuda={ext.with_cuda}"


# An error raised by a check inside the extension, as a user's script meets it. In a child process,
# so that a toolchain whose C++ exceptions cannot cross into torch fails this test, not the run.
RAISE = """
import torch, neurosens
try:
    torch.ops.neurosens.{call}
except {error} as err:
    print("raised:", err)
"""


@pytest.mark.parametrize("call,error,message", [
    ("neuron_distance(torch.randn(2, 3), torch.randn(2, 4), 'l1', 1, False)", "RuntimeError", "same shape"),
    ("neuron_topk(torch.randn(2, 3), torch.randn(2, 3), 0, 'l1', 1, False, True)", "ValueError", "k=0 is out of range"),
])
def test_an_error_inside_the_extension_reaches_python(call, error, message, tmp_path):
    if extension.EXTENSION is None:
        pytest.skip(f"the extension is not loaded: {extension.WHY_NOT}")
    # Run from an empty folder, so that the child imports the installed package, as this process
    # did, and not a source tree in the working directory.
    done = subprocess.run([sys.executable, "-c", RAISE.format(call=call, error=error)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and message in done.stdout, (done.returncode, done.stdout, done.stderr[-3000:])


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("neurosens_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


TORCH_FLAGS = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"


@pytest.mark.parametrize(
    "env,gpu_visible,torch_flags,expected",
    [
        ("", False, TORCH_FLAGS, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),  # no GPU: everything torch ships, PTX of the newest
        ("", False, "sm_90 sm_80 sm_90 compute_90", "8.0;9.0+PTX"),
        ("", False, "", "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),  # a CPU-only torch says nothing
        ("", True, TORCH_FLAGS, None),  # a visible GPU: torch picks its architecture
        ("8.9", True, TORCH_FLAGS, "8.9"),  # the user's choice wins
        ("7.5;12.0", False, TORCH_FLAGS, "7.5;12.0"),
    ],
)
def test_cuda_architectures(setup_module, env, gpu_visible, torch_flags, expected):
    assert setup_module.cuda_arch_list(env, gpu_visible, torch_flags) == expected


def test_cuda_build_flags(setup_module, monkeypatch):
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit")
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setenv("NVCC_FLAGS", "-Xptxas -v")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("NEUROSENS_NO_EXT", raising=False)
    monkeypatch.chdir(SETUP_PY.parent)
    import torch

    (ext,), _ = setup_module._extensions()
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-lineinfo" in nvcc and nvcc[-2:] == ["-Xptxas", "-v"]
    assert any(s.endswith(".cu") for s in ext.sources)
    if not torch.cuda.is_available():
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        assert archs.endswith("+PTX") and "7.5" in archs.split(";")
