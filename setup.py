"""Build of the neurosens extension.

The C++ CPU kernels always build; the CUDA kernels are added when a GPU is visible or when
FORCE_CUDA=1 (then CUDA_HOME must point at the toolkit). NEUROSENS_NO_EXT=1 builds no extension:
the package then runs on its pure-PyTorch reference.

GPU architectures: TORCH_CUDA_ARCH_LIST when set; else the visible GPU's (torch picks it); else,
with no GPU to ask, every architecture the installed torch ships kernels for, plus PTX of the
newest so that later GPUs can compile it at load time. NVCC_FLAGS adds flags to nvcc.
"""
import glob
import os
import platform
import shlex

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Used when the installed torch says nothing about its architectures (a CPU-only build of torch).
DEFAULT_ARCHS = ["7.5", "8.0", "8.6", "9.0", "10.0", "12.0"]


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_arch_list(env_value, gpu_visible, torch_arch_flags):
    """TORCH_CUDA_ARCH_LIST for the build; None lets torch use the visible GPU's architecture.

    ``torch_arch_flags`` is torch's own list ("sm_75 sm_80 ... sm_120"); the result names each
    of them and adds PTX of the newest, e.g. "7.5;8.0;9.0+PTX".
    """
    if env_value:
        return env_value
    if gpu_visible:
        return None
    archs = []
    for flag in torch_arch_flags.split():
        kind, _, num = flag.partition("_")
        if kind == "sm" and num.isdigit():
            archs.append(f"{num[:-1]}.{num[-1]}")
    archs = sorted(set(archs or DEFAULT_ARCHS), key=lambda v: tuple(map(int, v.split("."))))
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _extensions():
    if _flag("NEUROSENS_NO_EXT"):
        print("neurosens: NEUROSENS_NO_EXT is set, building no extension (the ops run on reference.py)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it silently runs serially.
    cxx = ["-O3", "-fopenmp", "-funroll-loops"]
    link = ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Lets the CPU kernels carry AVX2 clones next to the baseline ones (chosen at load time).
        cxx.append("-DNEUROSENS_X86_CLONES")
    include_dirs = [os.path.join(HERE, "csrc")]

    gpu_visible = torch.cuda.is_available() and CUDA_HOME is not None
    with_cuda = _flag("FORCE_CUDA") or gpu_visible
    if not with_cuda:
        print(f"neurosens: building the CPU kernels only (torch {torch.__version__}, no GPU visible, FORCE_CUDA unset); "
              f"cxx flags: {' '.join(cxx)}")
        ext = CppExtension(
            "neurosens._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
        return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    if CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
    flags_of_torch = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else ""
    archs = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST", ""), gpu_visible, flags_of_torch)
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # -lineinfo lets compute-sanitizer and profilers name source lines; it does not change the code.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + shlex.split(os.environ.get("NVCC_FLAGS", ""))
    print(f"neurosens: building the CPU and CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"toolkit {CUDA_HOME}); architectures: {archs or 'the visible GPU (chosen by torch)'}; "
          f"cxx flags: {' '.join(cxx)}; nvcc flags: {' '.join(nvcc)}")
    ext = CUDAExtension(
        "neurosens._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The build backend runs this file as __main__; tests import it for cuda_arch_list.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
