"""The public neuron-sensitivity ops.

Each op runs on the fused C++/CUDA kernels of the ``neurosens._C`` extension when it is built
for the tensor's device, and on :mod:`neurosens.reference` otherwise (one warning says so).
Arguments are checked here, before either backend, so both raise the same errors.

``a`` is always the benign activation and ``b`` its adversarial twin, of shape [N, C, ...]
(``channel_dim=1``) or [N, ..., C] (``channel_dim=-1``); a neuron is one index along the
channel dim. See :mod:`neurosens.reference` for the metric definitions. A NaN or an infinity in
one neuron's map makes that neuron's distance non-finite and leaves every other neuron's unchanged.
"""
from typing import NamedTuple

import torch

from . import extension, reference
from .checks import check_flag, check_index_range, check_indices, check_metric, check_pair
from .registration import register
from .selection import TopK, resolve_k

# Looked up at every call, so setting it to None switches every op to the reference.
_C = extension.EXTENSION


class NeuronDistance(NamedTuple):
    """Per-neuron sums of a distance over ``count`` samples; ``+`` (and ``sum()``) adds batches up."""

    sum: torch.Tensor
    count: int

    def mean(self):
        return self.sum / self.count

    def __add__(self, other):
        if not isinstance(other, NeuronDistance):
            return NotImplemented
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"NeuronDistance: sums over {self.sum.numel()} and {other.sum.numel()} neurons cannot be "
                             "added: they come from different layers")
        return NeuronDistance(self.sum + other.sum, self.count + other.count)

    def __radd__(self, other):
        # sum() starts from 0.
        return self if isinstance(other, int) and not isinstance(other, bool) and other == 0 else NotImplemented


def _use_extension(t):
    return extension.serves(_C, t)


def neuron_distance(a, b, metric="l1", channel_dim=1, relative=False):
    """Per-neuron distance between benign ``a`` and adversarial ``b``, summed over the batch.

    Returns ``NeuronDistance(sum, count)``: ``sum`` is a [C] float32 (float64 for float64 inputs)
    tensor, ``count`` the number of samples; ``+`` adds the results of several batches (the same
    sum as one call on all of them, up to float32 rounding in the last bits). One read
    of a and b; no activation-sized temporary, except the [N, C] per-sample distances of [N, C]
    inputs, summed in sample order. Not differentiable.
    """
    op = "neurosens.neuron_distance"
    cdim = check_pair(a, b, channel_dim, op)
    relative = check_flag(relative, op, "relative")
    check_metric(metric, op, relative=relative)
    a, b = a.detach(), b.detach()
    if _use_extension(a):
        total = torch.ops.neurosens.neuron_distance(a, b, metric, cdim, relative)
    else:
        total = reference.neuron_distance(a, b, metric, cdim, relative)
    return NeuronDistance(total, a.shape[0])


def neuron_distance_per_sample(a, b, metric="l1", channel_dim=1, relative=False):
    """[N, C] distance of every neuron for every sample (one read of a and b). Not differentiable."""
    op = "neurosens.neuron_distance_per_sample"
    cdim = check_pair(a, b, channel_dim, op)
    relative = check_flag(relative, op, "relative")
    check_metric(metric, op, relative=relative)
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
    cdim = check_pair(a, b, channel_dim, op)
    relative = check_flag(relative, op, "relative")
    check_metric(metric, op, relative=relative)
    largest = check_flag(largest, op, "largest")
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
    cdim = check_pair(a, b, channel_dim, op)
    check_metric(metric, op)
    return_indices = check_flag(return_indices, op, "return_indices")
    num_neurons = a.shape[cdim]
    if (k is None) == (indices is None):
        raise ValueError(f"{op}: give exactly one of k (how many neurons to select) and indices (which ones)")
    if indices is None:
        check_metric(select_metric, op, arg="select_metric")
        k = resolve_k(k, num_neurons, op)
    else:
        indices = torch.as_tensor(indices, device=a.device)
        check_indices(indices, a, op)
        k = resolve_k(indices.numel(), num_neurons, op, what="len(indices)")
    if _use_extension(a):
        # The extension checks the index range itself (on the device for CUDA indices).
        loss, indices, _ = torch.ops.neurosens.stabilize(a, b, indices, k, metric, select_metric, cdim)
    else:
        if indices is not None:
            check_index_range(indices, num_neurons, op)
        loss, indices = reference.stabilize(a, b, indices, k, metric, select_metric, cdim)
    return (loss, indices) if return_indices else loss


if _C is not None:
    register()
