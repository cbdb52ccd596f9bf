"""What torch needs to know about the extension's ops beyond their C++ kernels: fake kernels
(output shapes for torch.compile and meta tensors). The autograd of ``stabilize`` is C++
(csrc/autograd.cpp), so a training step reaches the kernels without a Python frame.

The public ops' fake kernels check their arguments as the C++ kernels do: a call that mixes meta
and real tensors is dispatched here and never reaches the C++ checks."""
import torch

from .checks import check_indices, check_metric, check_pair
from .reference import compute_dtype
from .selection import resolve_k


def _checked(op, a, b, channel_dim, metric, relative=False, k=None, indices=None):
    """The channel dim of a public op's arguments, after the checks its C++ kernel makes."""
    where = f"neurosens.{op}"
    cdim = check_pair(a, b, channel_dim, where)
    check_metric(metric, where, relative=relative)
    if k is not None:
        resolve_k(k, a.shape[cdim], where)
    if indices is not None:
        check_indices(indices, a, where, k)
    return cdim


def register():
    """Register the fake kernels; call once, after the extension loaded."""

    def acc_dtype(x):
        return compute_dtype(x.dtype)

    @torch.library.register_fake("neurosens::_pair_stats")
    def _(a, b, channel_dim, stats=63):
        return a.new_empty((a.shape[0], a.shape[channel_dim], 6), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::_stabilize_grad")
    def _(a, b, stats, weight, metric, channel_dim):
        return torch.empty_like(a), torch.empty_like(b)

    @torch.library.register_fake("neurosens::neuron_distance")
    def _(a, b, metric="l1", channel_dim=1, relative=False):
        cdim = _checked("neuron_distance", a, b, channel_dim, metric, relative)
        return a.new_empty((a.shape[cdim],), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::neuron_distance_per_sample")
    def _(a, b, metric="l1", channel_dim=1, relative=False):
        cdim = _checked("neuron_distance_per_sample", a, b, channel_dim, metric, relative)
        return a.new_empty((a.shape[0], a.shape[cdim]), dtype=acc_dtype(a))

    @torch.library.register_fake("neurosens::neuron_topk")
    def _(a, b, k, metric="l1", channel_dim=1, relative=False, largest=True):
        _checked("neuron_topk", a, b, channel_dim, metric, relative, k)
        return a.new_empty((k,), dtype=acc_dtype(a)), a.new_empty((k,), dtype=torch.int64)

    @torch.library.register_fake("neurosens::stabilize")
    def _(a, b, indices, k, metric="l1", select_metric="l1", channel_dim=1):
        cdim = _checked("stabilize", a, b, channel_dim, metric, k=k, indices=indices)
        check_metric(select_metric, "neurosens.stabilize", arg="select_metric")
        stats = a.new_empty((a.shape[0], a.shape[cdim], 6), dtype=acc_dtype(a))
        return a.new_empty((), dtype=acc_dtype(a)), a.new_empty((k,), dtype=torch.int64), stats

    @torch.library.register_fake("neurosens::_stabilize_backward")
    def _(grad, a, b, indices, stats, metric, channel_dim):
        return torch.empty_like(a), torch.empty_like(b)
