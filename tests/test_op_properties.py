"""Property-based checks of the ops against the pure-PyTorch reference, over shapes, layouts
(contiguous, channels_last, transposed, sliced), dtypes and values including 0, tiny, huge, inf
and NaN. A NaN or an infinity in one neuron's map makes that neuron's distance non-finite and
leaves every other neuron's untouched."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurosens import ops, reference

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (2e-2, 1e-3),
             torch.bfloat16: (5e-2, 1e-2)}
#: Magnitudes of the test values: zero, tiny (subnormal in float32), ordinary and huge (whose
#: squares still fit in float32).
SCALES = [0.0, 1e-40, 1e-20, 1e-3, 1.0, 1e3, 1e15]


@st.composite
def pairs(draw, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)):
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    channel_dim = draw(st.sampled_from([1, -1] if ndim > 2 else [1]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "channels_last"]))
    scale_a, scale_b = draw(st.sampled_from(SCALES)), draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if dtype in (torch.float16, torch.bfloat16):
        scale_a, scale_b = min(scale_a, 1e3), min(scale_b, 1e3)  # their range ends near 6e4 / 3e38

    def make(scale):
        full = list(shape)
        if layout == "sliced":
            full[-1] *= 2
        t = torch.randn(full, generator=gen, dtype=torch.float64) * scale
        zeros = torch.rand(full, generator=gen) < 0.2
        t = t.masked_fill(zeros, 0.0).to(dtype)
        if layout == "sliced":
            t = t[..., ::2]
        elif layout == "transposed" and ndim > 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif layout == "channels_last" and ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return make(scale_a), make(scale_b), channel_dim


def close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True)


@SETTINGS
@given(pairs(), st.sampled_from(reference.METRICS), st.booleans())
def test_per_sample_distance_matches_the_reference(pair, metric, relative):
    a, b, cdim = pair
    relative = relative and metric != "cosine"
    expected = reference.neuron_distance_per_sample(a, b, metric, cdim % a.dim(), relative)
    close(ops.neuron_distance_per_sample(a, b, metric, cdim, relative), expected, a.dtype)


@SETTINGS
@given(pairs(), st.sampled_from(reference.METRICS))
def test_summed_distance_matches_the_reference(pair, metric):
    a, b, cdim = pair
    result = ops.neuron_distance(a, b, metric, cdim)
    assert result.count == a.shape[0]
    close(result.sum, reference.neuron_distance(a, b, metric, cdim % a.dim()), a.dtype)


@SETTINGS
@given(pairs(dtypes=(torch.float32, torch.float64)), st.sampled_from(reference.METRICS), st.data())
def test_stabilize_matches_the_reference(pair, metric, data):
    a, b, cdim = pair
    channels = a.shape[cdim]
    indices = torch.tensor(sorted(data.draw(st.sets(st.integers(0, channels - 1), min_size=1))), dtype=torch.int64)
    expected, _ = reference.stabilize(a, b, indices, None, metric, "l1", cdim % a.dim())
    close(ops.stabilize(a, b, indices=indices, metric=metric, channel_dim=cdim), expected, a.dtype)


@SETTINGS
@given(st.sampled_from(reference.METRICS), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(0, 3), st.integers(0, 5),
       st.sampled_from([torch.float32, torch.float64]))
def test_non_finite_values_stay_in_their_neuron(metric, value, side, n, c, at, dtype):
    gen = torch.Generator().manual_seed(n * 100 + c * 10 + at)
    a = torch.randn(3, 4, 6, generator=gen, dtype=dtype)
    b = a + 0.1 * torch.randn(3, 4, 6, generator=gen, dtype=dtype)
    clean = reference.neuron_distance_per_sample(a, b, metric)
    (a if side == "a" else b)[n, c, at] = value
    out = ops.neuron_distance_per_sample(a, b, metric)
    assert not torch.isfinite(out[n, c]), out[n, c]
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[n, c] = False
    close(out[mask], clean[mask], dtype)
    summed = ops.neuron_distance(a, b, metric).sum
    assert not torch.isfinite(summed[c]) and torch.isfinite(summed[torch.arange(4) != c]).all()


def test_cosine_of_a_zero_map_and_a_tiny_nonzero_map():
    # Squares of such maps underflow to zero in float32: the maps must still not count as both zero.
    a, b = torch.zeros(1, 2), torch.tensor([[-3e-41, 0.0]])
    expected = reference.neuron_distance_per_sample(a, b, "cosine")
    assert expected.tolist() == [[1.0, 0.0]]
    torch.testing.assert_close(ops.neuron_distance_per_sample(a, b, "cosine"), expected)
    torch.testing.assert_close(ops.neuron_distance(a, b, "cosine").sum, expected.sum(0))
    indices = torch.tensor([0, 1])
    torch.testing.assert_close(ops.stabilize(a, b, indices=indices, metric="cosine"),
                               reference.stabilize(a, b, indices, None, "cosine", "l1", 1)[0])
