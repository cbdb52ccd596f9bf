"""Which neurons: ``k`` as a count or a fraction of a layer, and the top-k with one tie rule.

Ties go to the lower neuron index, whoever computed the values, so a ranking is the same on every
backend and every run. Nothing here needs the compiled extension: reading a saved report and
ranking its neurons stays pure PyTorch.
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from .checks import integer


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def resolve_k(k, num_neurons=None, op="neurosens", what="k"):
    """A neuron count from ``k``: an int in [1, C], or a float fraction in (0, 1] of C, rounded to
    the nearest count with halves up (10% of 25 neurons is 3) and at least 1.

    With ``num_neurons=None`` (a layer not built yet) only the form of ``k`` is checked and None
    is returned.
    """
    if isinstance(k, torch.Tensor) and k.dim() == 0 and k.is_floating_point():
        k = k.item() if k.dtype == torch.float64 else np.float32(k.item())
    if isinstance(k, np.floating):
        # The decimal a 32- or 16-bit fraction stands for (np.float32(0.35) is 0.3499999940...).
        k = float(k) if isinstance(k, np.float64) else float(str(k))
    if not isinstance(k, float):
        count = integer(k)
        if count is None:
            raise TypeError(f"{op}: {what} must be an int count or a float fraction, got {k!r}")
        k = count
    if isinstance(k, float):
        k = float(k)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"{op}: {what}={k} as a fraction must be in (0, 1]")
        # Halves up (Python's round() sends 2.5 to 2), on the product rounded to 9 places first, so
        # that 0.58 * 25 = 14.499999999999998 counts as the 14.5 it means.
        return None if num_neurons is None else max(1, math.floor(round(k * num_neurons, 9) + 0.5))
    if num_neurons is None:
        if k < 1:
            raise ValueError(f"{op}: {what}={k} must be at least 1")
        return None
    if not 1 <= k <= num_neurons:
        raise ValueError(f"{op}: {what}={k} is out of range: the layer has {num_neurons} neurons, so it must be in [1, {num_neurons}]")
    return k


def order(values, largest=True):
    """Indices of the 1-D ``values`` from largest (``largest=False``: smallest) on; ties keep the lower index first."""
    return torch.sort(values, descending=largest, stable=True).indices


def topk(values, k, largest=True):
    """The ``k`` largest (smallest) of the 1-D ``values``, in order, as :class:`TopK`."""
    chosen = order(values, largest)[:k]
    return TopK(values[chosen], chosen)


def ranks(values):
    """The rank of every entry of the 1-D ``values``: 1 for the largest, ties ranked by index."""
    rank = torch.empty_like(values, dtype=torch.int64)
    rank[order(values)] = torch.arange(1, values.numel() + 1, device=values.device)
    return rank
