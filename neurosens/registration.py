"""What torch needs to know about the extension's ops beyond their C++ kernels: fake kernels
(output shapes for torch.compile and meta tensors) and the autograd of ``stabilize``."""
import torch

from .reference import compute_dtype


def register():
    """Register the fake kernels and the autograd formula; call once, after the extension loaded."""

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

    def setup_context(ctx, inputs, output):
        a, b, _, _, metric, _, channel_dim = inputs
        _, indices, stats = output
        ctx.save_for_backward(a, b, indices, stats)
        ctx.mark_non_differentiable(indices, stats)
        # The gradients of indices and stats are never used: left undefined, autograd does not fill
        # an [N, C, 6] tensor of zeros for them at every backward.
        ctx.set_materialize_grads(False)
        ctx.metric, ctx.channel_dim = metric, channel_dim

    def backward(ctx, grad_loss, _grad_indices, _grad_stats):
        if grad_loss is None:
            return None, None, None, None, None, None, None
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
