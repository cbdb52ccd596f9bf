"""Argument checks shared by every public entry point.

Each raises with one line that names the caller (``where``) and what is wrong with which argument.
"""
import numpy as np
import torch

from .reference import METRICS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_metric(metric, where, arg="metric", relative=False):
    if metric not in METRICS:
        raise ValueError(f"{where}: unknown {arg}={metric!r}; expected one of {', '.join(map(repr, METRICS))}")
    if relative and metric == "cosine":
        raise ValueError(f"{where}: relative=True is not defined for metric='cosine' (the cosine is already scale-free)")


def check_flag(value, where, arg):
    """A yes/no option must be a bool: None or 1.0 would pass Python's truth test and mean something."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {arg}={value!r} must be True or False")
    return bool(value)


def integer(value):
    """``value`` as a Python int when it is one: an int, a numpy integer or a 0-d integer tensor;
    None for anything else, bools included (True is not the index 1)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return None


def check_channel_dim(channel_dim, shape, where, what="shape"):
    """The channel dim as a non-negative index into ``shape``: an int, in range, and not the batch dim 0."""
    shape = list(shape)
    given, channel_dim = channel_dim, integer(channel_dim)
    if channel_dim is None:
        raise TypeError(f"{where}: channel_dim={given!r} must be an int, not {type(given).__name__}")
    if not -len(shape) <= channel_dim < len(shape):
        raise ValueError(f"{where}: channel_dim={channel_dim} is out of range for {what} {shape}")
    cdim = channel_dim % len(shape)
    if cdim == 0:
        raise ValueError(f"{where}: channel_dim={channel_dim} points at the batch dim of {what} {shape}")
    return cdim


def check_indices(indices, a, where, k=None):
    """Given neuron indices: a 1-D int64 tensor on the device of the activations ``a``, non-empty,
    and of ``k`` entries when ``k`` is given (the count a raw op was passed beside them)."""
    if (indices.dim() != 1 or indices.dtype != torch.int64 or indices.device != a.device or indices.numel() == 0
            or (k is not None and indices.numel() != k)):
        entries = f"k={k}" if k is not None else "one or more"
        raise ValueError(f"{where}: indices must be a 1-D int64 tensor of {entries} entries on {a.device}, got "
                         f"{indices.dtype} of shape {list(indices.shape)} on {indices.device}")


def check_index_range(indices, num_neurons, where, what="indices"):
    """Every entry of the int tensor ``indices`` names one of ``num_neurons`` neurons."""
    if indices.numel() == 0:
        return
    if indices.device.type != "cpu" or torch.compiler.is_compiling():
        # Checked on the device (or in the compiled graph): a training step neither waits for the
        # GPU nor breaks CUDA-graph capture; a bad index stops the next synchronizing call.
        torch._assert_async(((indices >= 0) & (indices < num_neurons)).all(),
                            f"{where}: {what} must lie in [0, {num_neurons})")
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_neurons:
        raise ValueError(f"{where}: {what} must lie in [0, {num_neurons}), got values in [{lo}, {hi}]")


def check_pair(a, b, channel_dim, where):
    """A benign/adversarial activation pair; returns the channel dim as a non-negative index."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{where}: a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.device != b.device:
        raise RuntimeError(f"{where}: a and b must be on the same device, got a on {a.device} and b on {b.device}")
    if a.dtype != b.dtype:
        raise RuntimeError(f"{where}: a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{where}: a and b must be float32, float64, float16 or bfloat16, got {a.dtype}")
    if a.shape != b.shape:
        raise RuntimeError(f"{where}: a and b must have the same shape, got a {list(a.shape)} and b {list(b.shape)}")
    if a.dim() < 2:
        raise RuntimeError(f"{where}: activations need a batch and a neuron dim ([N, C, ...]), got shape {list(a.shape)}")
    cdim = check_channel_dim(channel_dim, a.shape, where)
    if a.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty (shape {list(a.shape)})")
    if a.numel() == 0:
        raise ValueError(f"{where}: activations of shape {list(a.shape)} have no elements")
    return cdim

