"""The compiled ``neurosens._C`` extension: loading it, and which tensors its kernels serve.

When it cannot be used (not built, or disabled with ``NEUROSENS_NO_EXT=1``) one warning says so at
import and the ops run on :mod:`neurosens.reference`.
"""
import warnings

import torch

from .env import env_flag
from .version import __version__


def _load():
    if env_flag("NEUROSENS_NO_EXT"):
        return None, "disabled by NEUROSENS_NO_EXT"
    try:
        from . import _C
    except ImportError as err:
        return None, f"the compiled extension could not be imported ({err})"
    return _C, None


EXTENSION, WHY_NOT = _load()
if EXTENSION is None:
    warnings.warn(
        f"neurosens is running on its pure-PyTorch reference ops: {WHY_NOT}. Results are the same, "
        "but slower and with activation-sized temporaries; reinstall with `pip install --no-build-isolation .` "
        "to build the fused kernels.",
        RuntimeWarning,
        stacklevel=2,
    )
_warned_device = False


def serves(ext, t):
    """Whether the loaded extension ``ext`` (None when not loaded) has kernels for ``t``'s device;
    warns once when it lacks them for a device it could not serve."""
    global _warned_device
    if ext is None:
        return False
    if t.device.type in ("cpu", "meta") or (t.device.type == "cuda" and ext.with_cuda):
        return True
    if not _warned_device:
        warnings.warn(
            f"neurosens: the extension has no kernels for {t.device.type} tensors; using the reference ops there",
            RuntimeWarning,
            stacklevel=4,
        )
        _warned_device = True
    return False


def info():
    """Which backends are built and which one the ops use."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension": "built" if EXTENSION is not None else f"not used: {WHY_NOT}",
        "cpu kernels": "fused (C++)" if EXTENSION is not None else "reference (PyTorch)",
        "cuda kernels": ("fused (CUDA)" if EXTENSION is not None and EXTENSION.with_cuda else "reference (PyTorch)")
        + ("" if torch.cuda.is_available() else ", no GPU visible"),
        "cpu threads": torch.get_num_threads(),
    }
