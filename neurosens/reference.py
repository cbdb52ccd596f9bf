"""Pure-PyTorch versions of every op in :mod:`neurosens.ops`.

They are the oracle the fused kernels are tested against and the fallback when the extension
is not built. They are written for clarity, not speed: each materializes activation-sized
temporaries. Inputs are assumed valid; :mod:`neurosens.ops` checks them before calling here.

Definitions, for a benign activation ``a`` and its adversarial twin ``b``, with neuron ``c`` of
sample ``n`` having a map of ``D`` elements:

* ``l1``:     sum |a - b| / D  (the mean absolute difference)
* ``l2``:     ||a - b||_2 / D
* ``cosine``: 1 - <a, b> / max(||a|| ||b||, COSINE_EPS); two all-zero maps are identical (0)
* ``relative=True`` divides ``l1``/``l2`` by max(mean |a|, RELATIVE_EPS)
"""
import torch

METRICS = ("l1", "l2", "cosine")
COSINE_EPS = 1e-8
RELATIVE_EPS = 1e-6


def compute_dtype(dtype):
    """Accumulation dtype: float64 stays float64, everything else is summed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def neuron_maps(x, channel_dim=1):
    """View ``x`` as [N, C, D]: samples, neurons, elements of each neuron's map."""
    x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1).to(compute_dtype(x.dtype))


def neuron_distance_per_sample(a, b, metric="l1", channel_dim=1, relative=False):
    """[N, C] distance between each neuron's benign and adversarial map, per sample."""
    A, B = neuron_maps(a, channel_dim), neuron_maps(b, channel_dim)
    D = A.shape[-1]
    if metric == "l1":
        dist = (A - B).abs().sum(-1) / D
    elif metric == "l2":
        dist = torch.linalg.vector_norm(A - B, dim=-1) / D
    elif metric == "cosine":
        na, nb = torch.linalg.vector_norm(A, dim=-1), torch.linalg.vector_norm(B, dim=-1)
        cos = (A * B).sum(-1) / (na * nb).clamp_min(COSINE_EPS)
        # Exact zeros, not zero norms: the squares of maps below ~1e-22 underflow in float32.
        both_zero = ((A == 0) & (B == 0)).all(-1)
        dist = torch.where(both_zero, torch.zeros_like(cos), 1 - cos)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if relative:
        dist = dist / (A.abs().sum(-1) / D).clamp_min(RELATIVE_EPS)
    return dist


def neuron_distance(a, b, metric="l1", channel_dim=1, relative=False):
    """[C] per-neuron sum over samples of :func:`neuron_distance_per_sample`."""
    return neuron_distance_per_sample(a, b, metric, channel_dim, relative).sum(0)


def neuron_topk(a, b, k, metric="l1", channel_dim=1, relative=False, largest=True):
    """The k neurons with the largest (or smallest) mean distance over the batch; ties go to the
    lower index, as in the fused ops."""
    mean = neuron_distance_per_sample(a, b, metric, channel_dim, relative).mean(0)
    values, indices = torch.sort(mean, descending=largest, stable=True)
    return torch.return_types.topk((values[:k], indices[:k]))


def stabilize(a, b, indices=None, k=None, metric="l1", select_metric="l1", channel_dim=1):
    """Mean ``metric`` distance over samples and the selected neurons, differentiable in a and b.

    Neurons are ``indices`` when given, else the top ``k`` by ``select_metric`` on this batch (the
    selection itself is not differentiated). Returns ``(loss, indices)``.
    """
    if indices is None:
        with torch.no_grad():
            indices = neuron_topk(a.detach(), b.detach(), k, select_metric, channel_dim).indices
    dist = neuron_distance_per_sample(a, b, metric, channel_dim)
    return dist.index_select(1, indices).mean(), indices
