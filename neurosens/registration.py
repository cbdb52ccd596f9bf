"""What torch needs to know about the extension's ops beyond their C++ kernels: fake kernels
(output shapes for torch.compile and meta tensors). The autograd of ``stabilize`` is C++
(csrc/autograd.cpp), so a training step reaches the kernels without a Python frame."""
import torch

from .reference import compute_dtype


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
