"""The public neuron-sensitivity ops.

Each op runs on the fused C++/CUDA kernels of the ``neurosens._C`` extension when it is built
for the tensor's device, and on :mod:`neurosens.reference` otherwise (one warning says so).
Arguments are checked here, before either backend, so both raise the same errors.

``a`` is always the benign activation and ``b`` its adversarial twin, of shape [N, C, ...]
(``channel_dim=1``) or [N, ..., C] (``channel_dim=-1``); a neuron is one index along the
channel dim. See :mod:`neurosens.reference` for the metric definitions.
"""
import os
import warnings
from typing import NamedTuple

import torch

from . import __version__, reference
from .reference import METRICS

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_extension():
    if os.environ.get("NEUROSENS_NO_EXT", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        return None, "disabled by NEUROSENS_NO_EXT"
    try:
        from . import _C
    except ImportError as err:
        return None, f"the compiled extension could not be imported ({err})"
    return _C, None


_C, _WHY_NO_EXT = _load_extension()
_warned_cuda_fallback = False
if _C is None:
    warnings.warn(
        f"neurosens is running on its pure-PyTorch reference ops: {_WHY_NO_EXT}. Results are the same, "
        "but slower and with activation-sized temporaries; reinstall with `pip install --no-build-isolation .` "
        "to build the fused kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


class NeuronDistance(NamedTuple):
    """Per-neuron sums of a distance over ``count`` samples; add them up across batches."""

    sum: torch.Tensor
    count: int

    def mean(self):
        return self.sum / self.count


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def info():
    """Which backends are built and which one the ops use."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension": "built" if _C is not None else f"not used: {_WHY_NO_EXT}",
        "cpu kernels": "fused (C++)" if _C is not None else "reference (PyTorch)",
        "cuda kernels": ("fused (CUDA)" if _C is not None and _C.with_cuda else "reference (PyTorch)")
        + ("" if torch.cuda.is_available() else ", no GPU visible"),
        "cpu threads": torch.get_num_threads(),
    }


def _use_extension(t):
    global _warned_cuda_fallback
    if _C is None:
        return False
    if t.device.type in ("cpu", "meta") or (t.device.type == "cuda" and _C.with_cuda):
        return True
    if not _warned_cuda_fallback:
        warnings.warn(
            f"neurosens: the extension has no kernels for {t.device.type} tensors; using the reference ops there",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_cuda_fallback = True
    return False


def _check_pair(a, b, channel_dim, op):
    """Validate a benign/adversarial pair; return the channel dim as a non-negative index."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{op}: a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.device != b.device:
        raise RuntimeError(f"{op}: a and b must be on the same device, got a on {a.device} and b on {b.device}")
    if a.dtype != b.dtype:
        raise RuntimeError(f"{op}: a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{op}: a and b must be float32, float64, float16 or bfloat16, got {a.dtype}")
    if a.shape != b.shape:
        raise RuntimeError(f"{op}: a and b must have the same shape, got a {list(a.shape)} and b {list(b.shape)}")
    if a.dim() < 2:
        raise RuntimeError(f"{op}: activations need a batch and a neuron dim ([N, C, ...]), got shape {list(a.shape)}")
    if not isinstance(channel_dim, int) or not -a.dim() <= channel_dim < a.dim():
        raise ValueError(f"{op}: channel_dim={channel_dim} is out of range for shape {list(a.shape)}")
    cdim = channel_dim % a.dim()
    if cdim == 0:
        raise ValueError(f"{op}: channel_dim={channel_dim} points at the batch dim of shape {list(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{op}: the batch is empty (shape {list(a.shape)})")
    if a.numel() == 0:
        raise ValueError(f"{op}: activations of shape {list(a.shape)} have no elements")
    return cdim


def _check_metric(metric, op, arg="metric", relative=False):
    if metric not in METRICS:
        raise ValueError(f"{op}: unknown {arg}={metric!r}; expected one of {', '.join(map(repr, METRICS))}")
    if relative and metric == "cosine":
        raise ValueError(f"{op}: relative=True is not defined for metric='cosine' (the cosine is already scale-free)")


def resolve_k(k, num_neurons, op="neurosens", what="k"):
    """A neuron count from ``k``: an int in [1, C], or a float fraction in (0, 1] of C (at least 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{op}: {what} must be an int count or a float fraction, got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"{op}: {what}={k} as a fraction must be in (0, 1]")
        return max(1, round(k * num_neurons))
    if not 1 <= k <= num_neurons:
        raise ValueError(f"{op}: {what}={k} is out of range: the layer has {num_neurons} neurons, so it must be in [1, {num_neurons}]")
    return k


def neuron_distance(a, b, metric="l1", channel_dim=1, relative=False):
    """Per-neuron distance between benign ``a`` and adversarial ``b``, summed over the batch.

    Returns ``NeuronDistance(sum, count)``: ``sum`` is a [C] float32 (float64 for float64 inputs)
    tensor, ``count`` the number of samples, so sums of several batches add up exactly. One read
    of a and b; no activation-sized temporary. Not differentiable.
    """
    op = "neurosens.neuron_distance"
    cdim = _check_pair(a, b, channel_dim, op)
    _check_metric(metric, op, relative=relative)
    a, b = a.detach(), b.detach()
    if _use_extension(a):
        total = torch.ops.neurosens.neuron_distance(a, b, metric, cdim, relative)
    else:
        total = reference.neuron_distance(a, b, metric, cdim, relative)
    return NeuronDistance(total, a.shape[0])


def neuron_distance_per_sample(a, b, metric="l1", channel_dim=1, relative=False):
    """[N, C] distance of every neuron for every sample (one read of a and b). Not differentiable."""
    op = "neurosens.neuron_distance_per_sample"
    cdim = _check_pair(a, b, channel_dim, op)
    _check_metric(metric, op, relative=relative)
    a, b = a.detach(), b.detach()
    if _use_extension(a):
        return torch.ops.neurosens.neuron_distance_per_sample(a, b, metric, cdim, relative)
    return reference.neuron_distance_per_sample(a, b, metric, cdim, relative)


def neuron_topk(a, b, k=0.1, metric="l1", channel_dim=1, relative=False, largest=True):
    """The ``k`` most (``largest=False``: least) sensitive neurons of a batch, in one pass.

    ``k`` is a count or a fraction of the layer's neurons (default 10%). Returns
    ``TopK(values, indices)`` sorted by value, equal values by index (ties go to the lower index);
    values are mean distances over the batch.
    """
    op = "neurosens.neuron_topk"
    cdim = _check_pair(a, b, channel_dim, op)
    _check_metric(metric, op, relative=relative)
    k = resolve_k(k, a.shape[cdim], op)
    a, b = a.detach(), b.detach()
    if _use_extension(a):
        values, indices = torch.ops.neurosens.neuron_topk(a, b, k, metric, cdim, relative, largest)
    else:
        values, indices = reference.neuron_topk(a, b, k, metric, cdim, relative, largest)
    return TopK(values, indices)


def stabilize(a, b, k=None, indices=None, metric="l1", select_metric="l1", channel_dim=1, return_indices=False):
    """Stabilizing loss: mean ``metric`` distance over samples and the chosen neurons.

    The neurons are ``indices`` when given, else the top ``k`` (count or fraction) by
    ``select_metric`` on this batch, chosen in the same pass and not differentiated. The loss is
    differentiable in ``a`` and ``b`` (detach ``a`` to pull only the adversarial side); its
    backward is one fused pass whose gradient is zero outside the chosen neurons. Returns the
    loss, or ``(loss, indices)`` with ``return_indices=True``.
    """
    op = "neurosens.stabilize"
    cdim = _check_pair(a, b, channel_dim, op)
    _check_metric(metric, op)
    num_neurons = a.shape[cdim]
    if (k is None) == (indices is None):
        raise ValueError(f"{op}: give exactly one of k (how many neurons to select) and indices (which ones)")
    if indices is None:
        _check_metric(select_metric, op, arg="select_metric")
        k = resolve_k(k, num_neurons, op)
    else:
        indices = torch.as_tensor(indices, device=a.device)
        if indices.dim() != 1 or indices.dtype != torch.int64 or indices.numel() == 0:
            raise ValueError(f"{op}: indices must be a non-empty 1-D int64 tensor, got {indices.dtype} of shape {list(indices.shape)}")
        k = resolve_k(indices.numel(), num_neurons, op, what="len(indices)")
    if _use_extension(a):
        loss, indices, _ = torch.ops.neurosens.stabilize(a, b, indices, k, metric, select_metric, cdim)
    else:
        if indices is not None:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= num_neurons:
                raise ValueError(f"{op}: indices must lie in [0, {num_neurons}) for activations of shape {list(a.shape)}, got values in [{lo}, {hi}]")
        loss, indices = reference.stabilize(a, b, indices, k, metric, select_metric, cdim)
    return (loss, indices) if return_indices else loss


def _register_python_parts():
    """Fake kernels (shapes for torch.compile and meta tensors) and the autograd of stabilize."""

    def acc_dtype(x):
        return reference.compute_dtype(x.dtype)

    @torch.library.register_fake("neurosens::_pair_stats")
    def _(a, b, channel_dim, stats=63):
        return a.new_empty((a.shape[0], a.shape[channel_dim], 6), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::_stabilize_grad")
    def _(a, b, stats, weight, metric, channel_dim):
        return torch.empty_like(a), torch.empty_like(b)

    @torch.library.register_fake("neurosens::neuron_distance")
    def _(a, b, metric="l1", channel_dim=1, relative=False):
        return a.new_empty((a.shape[channel_dim],), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::neuron_distance_per_sample")
    def _(a, b, metric="l1", channel_dim=1, relative=False):
        return a.new_empty((a.shape[0], a.shape[channel_dim]), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::neuron_topk")
    def _(a, b, k, metric="l1", channel_dim=1, relative=False, largest=True):
        return a.new_empty((k,), dtype=acc_dtype(a)), a.new_empty((k,), dtype=torch.int64)

    @torch.library.register_fake("neurosens::stabilize")
    def _(a, b, indices, k, metric="l1", select_metric="l1", channel_dim=1):
        stats = a.new_empty((a.shape[0], a.shape[channel_dim], 6), dtype=acc_dtype(a))
        return a.new_empty((), dtype=acc_dtype(a)), a.new_empty((k,), dtype=torch.int64), stats

    @torch.library.register_fake("neurosens::_stabilize_backward")
    def _(grad, a, b, indices, stats, metric, channel_dim):
        return torch.empty_like(a), torch.empty_like(b)

    def setup_context(ctx, inputs, output):
        a, b, _, _, metric, _, channel_dim = inputs
        _, indices, stats = output
        ctx.save_for_backward(a, b, indices, stats)
        ctx.mark_non_differentiable(indices, stats)
        ctx.metric, ctx.channel_dim = metric, channel_dim

    def backward(ctx, grad_loss, _grad_indices, _grad_stats):
        a, b, indices, stats = ctx.saved_tensors
        grad_a, grad_b = torch.ops.neurosens._stabilize_backward(grad_loss, a, b, indices, stats, ctx.metric, ctx.channel_dim)
        need_a, need_b = ctx.needs_input_grad[:2]
        return (grad_a if need_a else None), (grad_b if need_b else None), None, None, None, None, None

    torch.library.register_autograd("neurosens::stabilize", backward, setup_context=setup_context)

    def double_backward(ctx, _grad_a, _grad_b):
        raise RuntimeError(
            "neurosens.stabilize: second-order gradients are not supported (its fused backward is not differentiable); "
            "use neurosens.reference.stabilize for double backward"
        )

    torch.library.register_autograd("neurosens::_stabilize_backward", double_backward, setup_context=lambda ctx, inputs, output: None)


if _C is not None:
    _register_python_parts()
