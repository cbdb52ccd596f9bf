"""Build of the neurosens extension.

The C++ CPU kernels always build; the CUDA kernels are added when a GPU is visible or when
FORCE_CUDA=1 (then CUDA_HOME must point at the toolkit). NEUROSENS_NO_EXT=1 builds no extension:
the package then runs on its pure-PyTorch reference.
"""
import glob
import os
import platform

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("NEUROSENS_NO_EXT"):
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

    with_cuda = _flag("FORCE_CUDA") or (torch.cuda.is_available() and CUDA_HOME is not None)
    if with_cuda:
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        # With no GPU to query, torch cannot pick architectures; nvcc 13 supports 7.5 and above.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "neurosens._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "neurosens._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
