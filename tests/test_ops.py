"""The fused ops against their pure-PyTorch twins in float64, on many shapes, dtypes and layouts."""
import math
import os
import random

import pytest
import torch

from neurosens import ops, reference

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nc", "nchw", "channels_last", "sliced", "ntc", "ncdhw", "channels_last_3d", "mixed", "transposed", "unit_dims",
           "vector_rows", "one_map", "channels_last_sliced"]
METRICS = ["l1", "l2", "cosine"]

requires_ext = pytest.mark.skipif(ops._C is None, reason="the extension is not built")


def make_pair(layout, dtype, device, seed):
    """Random benign/adversarial activations in one of the layouts the kernels must honour.

    The layout is made on the device, in the dtype (a conversion or a copy would make strided
    tensors dense), for a and b alike."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    N, C = rng.randint(1, 5), rng.randint(1, 9)
    H, W = rng.randint(1, 7), rng.randint(1, 7)

    def pair(*shape, view_a=lambda t: t, view_b=None):
        a = torch.randn(*shape, generator=gen, dtype=torch.float64)
        # b is a perturbed a, as in the real use: near, not independent.
        b = a + 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
        a, b = (t.to(device=device, dtype=dtype) for t in (a, b))
        return view_a(a), (view_b or view_a)(b)

    def channels_last(t):
        return t.contiguous(memory_format=torch.channels_last)

    channel_dim = 1
    if layout == "nc":
        a, b = pair(N, C)
    elif layout == "nchw":
        a, b = pair(N, C, H, W)
    elif layout == "channels_last":
        a, b = pair(N, C, H, W, view_a=channels_last)
    elif layout == "sliced":
        a, b = pair(N + 1, 2 * C, 2 * H + 1, W + 2, view_a=lambda t: t[1:, ::2, 1::2, 1:-1])
    elif layout == "ntc":
        (a, b), channel_dim = pair(N, H * W, C), -1
    elif layout == "ncdhw":
        a, b = pair(N, C, 3, H, W)
    elif layout == "channels_last_3d":
        a, b = pair(N, C, 2, H, W, view_a=lambda t: t.contiguous(memory_format=torch.channels_last_3d))
    elif layout == "mixed":
        a, b = pair(N, C, H, W, view_b=channels_last)
    elif layout == "transposed":
        a, b = pair(N, H, C, W, view_a=lambda t: t.transpose(1, 2))
    elif layout == "unit_dims":
        a, b = pair(N, C, 1, W, 1)
    elif layout == "vector_rows":
        # Maps of 8 * H elements: every row starts 16-byte aligned, whatever the dtype.
        a, b = pair(N, C, H, 8)
    elif layout == "one_map":
        # One long map: 16-byte loads, then a tail of the odd elements left over.
        a, b = pair(1, 1, 37 + H * W)
    elif layout == "channels_last_sliced":
        # Neurons adjacent, positions in two runs that cannot be merged.
        a, b = pair(N, C, H + 1, W + 3, view_a=lambda t: channels_last(t)[:, :, 1:, 1:-2])
    else:
        raise AssertionError(layout)
    return a, b, channel_dim


def tolerance(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}


def cases():
    return [(layout, dtype, seed) for layout in LAYOUTS for dtype in DTYPES for seed in range(3)]


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,dtype,seed", cases())
def test_neuron_distance_matches_reference(device, layout, dtype, seed):
    a, b, cdim = make_pair(layout, dtype, device, seed)
    for metric in METRICS:
        for relative in ([False, True] if metric != "cosine" else [False]):
            expected = reference.neuron_distance_per_sample(a.double(), b.double(), metric, cdim, relative)
            per_sample = ops.neuron_distance_per_sample(a, b, metric, cdim, relative)
            total = ops.neuron_distance(a, b, metric, cdim, relative)
            assert per_sample.dtype == reference.compute_dtype(dtype)
            assert total.count == a.shape[0]
            torch.testing.assert_close(per_sample.double(), expected, **tolerance(dtype))
            torch.testing.assert_close(total.sum.double(), expected.sum(0), **tolerance(dtype))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neuron_topk_matches_reference(device, layout, dtype):
    a, b, cdim = make_pair(layout, dtype, device, seed=11)
    C = a.shape[cdim]
    for metric in METRICS:
        for largest in (True, False):
            k = max(1, C // 2)
            values, indices = ops.neuron_topk(a, b, k, metric, cdim, largest=largest)
            mean = reference.neuron_distance_per_sample(a.double(), b.double(), metric, cdim).mean(0)
            expected = torch.topk(mean, k, largest=largest).values
            torch.testing.assert_close(values.double(), expected, **tolerance(dtype))
            # Indices may differ only between tied neurons: their true values must match.
            torch.testing.assert_close(mean[indices], expected, **tolerance(dtype))
            assert indices.unique().numel() == k


def test_fraction_k_resolves_to_a_count():
    a, b, cdim = make_pair("nchw", torch.float32, "cpu", seed=3)
    a = torch.randn(4, 40, 3, 3)
    b = a + torch.randn_like(a)
    assert ops.neuron_topk(a, b).indices.numel() == 4  # 10% of 40 by default
    assert ops.neuron_topk(a, b, 0.25).indices.numel() == 10
    assert ops.neuron_topk(a, b, 0.001).indices.numel() == 1


def _grads(fn, a, b):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [5, 1])  # an odd and an even number of neurons (16-bit columns go in pairs)
def test_stabilize_forward_and_backward_match_reference(device, layout, dtype, metric, seed):
    a, b, cdim = make_pair(layout, dtype, device, seed=seed)
    C = a.shape[cdim]
    k = max(1, C // 3)
    loss, idx = ops.stabilize(a, b, k=k, metric=metric, channel_dim=cdim, return_indices=True)
    _, ref_idx = reference.stabilize(a.double(), b.double(), k=k, metric=metric, channel_dim=cdim)
    sel = reference.neuron_distance_per_sample(a.double(), b.double(), "l1", cdim).mean(0)
    torch.testing.assert_close(sel[idx], sel[ref_idx], **tolerance(dtype))

    got = _grads(lambda x, y: ops.stabilize(x, y, indices=idx, metric=metric, channel_dim=cdim), a, b)
    ref = _grads(lambda x, y: reference.stabilize(x, y, indices=idx, metric=metric, channel_dim=cdim)[0], a.double(), b.double())
    torch.testing.assert_close(got[0].double(), ref[0], **tolerance(dtype))
    torch.testing.assert_close(loss.double(), ref[0], **tolerance(dtype))
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == dtype and g.shape == r.shape
        # Gradients are rounded once to the input dtype; a zero gradient (the cosine of a
        # one-element map) is compared at the loss's own scale, 1 / (samples * neurons).
        scale = max(r.abs().max().item(), 1.0 / (a.shape[0] * k))
        rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * scale)
        outside = torch.ones(C, dtype=torch.bool, device=g.device)
        outside[idx] = False
        assert g.movedim(cdim, 1)[:, outside].abs().max().item() == 0.0 if outside.any() else True


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "ntc"])
def test_stabilize_gradcheck(device, metric, layout):
    a, b, cdim = make_pair(layout, torch.float64, device, seed=7)
    a.requires_grad_()
    b.requires_grad_()
    idx = torch.arange(0, a.shape[cdim], 2, device=device)
    assert torch.autograd.gradcheck(lambda x, y: ops.stabilize(x, y, indices=idx, metric=metric, channel_dim=cdim), (a, b))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric,select_metric", [("l1", "l2"), ("cosine", "l1"), ("l2", "cosine"), ("l2", "l2")])
def test_stabilize_selects_by_its_own_metric(device, metric, select_metric):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(5, 12, 3, 4, generator=gen, dtype=torch.float64)
    b = a + 0.5 * torch.randn(5, 12, 3, 4, generator=gen, dtype=torch.float64)
    a, b = a.to(device), b.to(device)
    loss, idx = ops.stabilize(a, b, k=4, metric=metric, select_metric=select_metric, return_indices=True)
    means = reference.neuron_distance_per_sample(a, b, select_metric).mean(0)
    assert idx.tolist() == torch.sort(means, descending=True, stable=True).indices[:4].tolist()
    expected = reference.neuron_distance_per_sample(a, b, metric)[:, idx].mean()
    torch.testing.assert_close(loss, expected, **tolerance(torch.float64))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilize_gradient_by_hand(device, dtype):
    # l2 of neuron c over N samples and k listed neurons: d loss / d a = (a - b) / (|a - b| D N k)
    # per listed time; a neuron listed twice counts twice, one not listed gets zero.
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64)
    b = a + torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64)
    idx = [3, 0, 3]
    diff = a - b
    norm = diff.flatten(2).norm(dim=2)[:, :, None, None]
    times = torch.tensor([idx.count(c) for c in range(5)], dtype=torch.float64)[None, :, None, None]
    expected = 2.5 * times * diff / (norm * 6 * 3 * len(idx))
    x, y = a.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_()
    loss = ops.stabilize(x, y, indices=torch.tensor(idx, device=device), metric="l2")
    torch.testing.assert_close(loss.double().cpu(), (norm[..., 0, 0] / 6)[:, idx].mean(), rtol=1e-5, atol=0)
    (2.5 * loss).backward()
    torch.testing.assert_close(x.grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.grad.double().cpu(), -expected, rtol=1e-5, atol=1e-7)


@requires_ext
def test_stabilize_gradient_only_where_asked():
    a = torch.randn(4, 6, 5)
    b = a + torch.randn(4, 6, 5)
    y = b.clone().requires_grad_()
    ops.stabilize(a, y, k=2).backward()  # a does not require grad
    ref_b = b.clone().requires_grad_()
    reference.stabilize(a, ref_b, k=2)[0].backward()
    torch.testing.assert_close(y.grad, ref_b.grad)
    x = a.clone().requires_grad_()
    (only_a,) = torch.autograd.grad(ops.stabilize(x, b, k=2), [x])
    ref_a = a.clone().requires_grad_()
    reference.stabilize(ref_a, b, k=2)[0].backward()
    torch.testing.assert_close(only_a, ref_a.grad)
    with torch.no_grad():
        assert not ops.stabilize(x, y, k=2).requires_grad


@requires_ext
def test_stabilize_edge_cases_have_finite_gradients():
    a = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    a[:, 1] = 0.0  # a dead neuron: both maps zero
    b = a.clone()
    b[:, 2] += 0.5
    for metric in METRICS:
        loss, ga, gb = _grads(lambda x, y: ops.stabilize(x, y, indices=torch.arange(4), metric=metric), a, b)
        ref = reference.stabilize(a, b, indices=torch.arange(4), metric=metric)[0]
        torch.testing.assert_close(loss, ref)
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
        # Identical maps sit at the minimum for every metric.
        assert ga[:, [0, 1, 3]].abs().max().item() < 1e-6
    per = ops.neuron_distance_per_sample(a, b, "cosine")
    assert per[:, 1].abs().max().item() == 0.0  # two all-zero maps are identical
    assert per[:, 0].abs().max().item() < 1e-12


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    a, b, cdim = make_pair("channels_last", torch.float32, device, seed=2)
    a = torch.randn(3, 6, 4, 5, device=device)
    b = a + 0.2 * torch.randn_like(a)
    idx = torch.tensor([0, 3, 5], device=device)
    nsops = torch.ops.neurosens
    stats = nsops._pair_stats(a, b, 1, 63)
    weight = torch.tensor([0.5, 0.0, 0.0, 0.25, 0.0, 1.0], device=device)
    cases = [
        (nsops._pair_stats.default, (a, b, 1, 63)),
        (nsops._pair_stats.default, (a, b, 1, 1)),
        (nsops._stabilize_grad.default, (a, b, stats, weight, "cosine", 1)),
        (nsops.neuron_distance.default, (a, b, "l2", 1, True)),
        (nsops.neuron_distance_per_sample.default, (a, b, "cosine", 1, False)),
        (nsops.neuron_topk.default, (a, b, 2, "l1", 1, False, True)),
        (nsops.stabilize.default, (a.requires_grad_(), b.requires_grad_(), None, 2, "cosine", "l1", 1)),
        (nsops.stabilize.default, (a, b, idx, 3, "l2", "l1", 1)),
        (nsops.stabilize.default, (a, b, None, 2, "l1", "cosine", 1)),
        (nsops.stabilize.default, (a, b, torch.tensor([4, 1, 4], device=device), 3, "l1", "l1", 1)),
        (nsops._stabilize_backward.default, (torch.tensor(1.0, device=device), a.detach(), b.detach(), idx, stats, "cosine", 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    a = torch.randn(4, 8, 6, 6, device=device)
    b = a + 0.1 * torch.randn_like(a)

    @torch.compile(fullgraph=True)
    def measure(x, y):
        total = ops.neuron_distance(x, y, "l2")
        per_sample = ops.neuron_distance_per_sample(x, y, "cosine")
        top = ops.neuron_topk(x, y, 3)
        return total.sum, per_sample, top.values, top.indices

    @torch.compile(fullgraph=True)
    def penalty(x, y):
        return 2.0 * ops.stabilize(x, y, k=3)

    got = measure(a, b)
    expected = (ops.neuron_distance(a, b, "l2").sum, ops.neuron_distance_per_sample(a, b, "cosine"), *ops.neuron_topk(a, b, 3))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    penalty(x, y).backward()
    _, ga, gb = _grads(lambda p, q: 2.0 * ops.stabilize(p, q, k=3), a, b)
    torch.testing.assert_close(x.grad, ga)
    torch.testing.assert_close(y.grad, gb)


@requires_ext
def test_batches_accumulate_to_the_whole():
    a = torch.randn(10, 5, 3, 3)
    b = a + torch.randn_like(a)
    parts = [ops.neuron_distance(a[i:i + 3], b[i:i + 3]) for i in range(0, 10, 3)]
    whole = ops.neuron_distance(a, b)
    assert sum(p.count for p in parts) == whole.count == 10
    torch.testing.assert_close(sum(p.sum for p in parts), whole.sum)
    torch.testing.assert_close(whole.mean(), reference.neuron_distance_per_sample(a.double(), b.double()).mean(0).float())


@requires_ext
def test_does_not_track_gradients():
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(2, 3, 4)
    assert not ops.neuron_distance(a, b).sum.requires_grad
    assert not ops.neuron_topk(a, b, 1).values.requires_grad


BAD_INPUTS = [
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 4)), RuntimeError, r"same shape.*\[2, 3\].*\[2, 4\]"),
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3).double()), RuntimeError, "same dtype"),
    (lambda: ops.neuron_distance(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)), RuntimeError, "float32, float64"),
    (lambda: ops.neuron_distance(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "batch is empty"),
    (lambda: ops.neuron_distance(torch.randn(2, 0, 4), torch.randn(2, 0, 4)), ValueError, "no elements"),
    (lambda: ops.neuron_distance(torch.randn(5), torch.randn(5)), RuntimeError, r"batch and a neuron dim.*\[5\]"),
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3), "l3"), ValueError, "unknown metric='l3'"),
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3), channel_dim=2), ValueError, r"channel_dim=2 is out of range.*\[2, 3\]"),
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3), channel_dim=0), ValueError, "batch dim"),
    (lambda: ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3), "cosine", relative=True), ValueError, "relative=True"),
    (lambda: ops.neuron_topk(torch.randn(2, 3), torch.randn(2, 3), 4), ValueError, r"k=4 is out of range.*3 neurons"),
    (lambda: ops.neuron_topk(torch.randn(2, 3), torch.randn(2, 3), 0), ValueError, "k=0 is out of range"),
    (lambda: ops.neuron_topk(torch.randn(2, 3), torch.randn(2, 3), 1.5), ValueError, r"fraction must be in \(0, 1\]"),
    (lambda: ops.stabilize(torch.randn(2, 3), torch.randn(2, 3)), ValueError, "exactly one of k"),
    (lambda: ops.stabilize(torch.randn(2, 3), torch.randn(2, 3), indices=torch.tensor([0, 3])), ValueError, r"indices must lie in \[0, 3\)"),
    (lambda: ops.stabilize(torch.randn(2, 3), torch.randn(2, 3), indices=torch.tensor([[0]])), ValueError, "1-D int64"),
    (lambda: ops.stabilize(torch.randn(2, 3), torch.randn(2, 3), k=1, select_metric="max"), ValueError, "select_metric='max'"),
]


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(backend, call, error, message, monkeypatch):
    if backend == "extension" and ops._C is None:
        pytest.skip("the extension is not built")
    if backend == "reference":
        monkeypatch.setattr(ops, "_C", None)
    with pytest.raises(error, match=message):
        call()


@requires_ext
def test_kernels_check_their_inputs_directly():
    nsops = torch.ops.neurosens
    with pytest.raises(RuntimeError, match=r"same shape, got a \[2, 3\] and b \[3, 3\]"):
        nsops.neuron_distance(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="unknown metric='l0'"):
        nsops.neuron_topk(torch.randn(2, 3), torch.randn(2, 3), 1, "l0")
    with pytest.raises(ValueError, match=r"k=5 is out of range.*3 neurons"):
        nsops.stabilize(torch.randn(2, 3), torch.randn(2, 3), None, 5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        nsops.stabilize(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([-1]), 1)
    with pytest.raises(RuntimeError, match=r"stats must be a Float tensor of shape \[2, 3, 6\]"):
        nsops._stabilize_grad(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3, 4), torch.ones(3), "l1", 1)
    with pytest.raises(RuntimeError, match=r"weight must be a Float tensor of shape \[3\]"):
        nsops._stabilize_grad(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3, 6), torch.ones(2), "l1", 1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_mismatch_is_reported():
    with pytest.raises(RuntimeError, match="same device"):
        ops.neuron_distance(torch.randn(2, 3), torch.randn(2, 3, device="cuda"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_int64_indexing_beyond_2_31_elements():
    shape = (2, 4, 2**14, 2**15 + 1)  # > 2^32 elements
    needed = 2 * math.prod(shape) * torch.bfloat16.itemsize + 2**30  # a, b and room for the op
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory")
    a = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros_like(a)
    b[1, 3, -1, -1] = 1.0
    total = ops.neuron_distance(a, b, "l1")
    expected = torch.zeros(4, device="cuda")
    expected[3] = 1.0 / (2**14 * (2**15 + 1))
    torch.testing.assert_close(total.sum, expected)


def test_reference_fallback_in_a_fresh_process():
    """NEUROSENS_NO_EXT=1 runs everything on reference.py and says so exactly once."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import neurosens\n"
        "    a = torch.randn(3, 4, 5, 5); b = a + torch.randn_like(a)\n"
        "    neurosens.neuron_distance(a, b); neurosens.neuron_topk(a, b, 2)\n"
        "    loss = neurosens.stabilize(a.requires_grad_(), b, k=2); loss.backward()\n"
        "print(sum('pure-PyTorch reference' in str(x.message) for x in w), neurosens.info()['cpu kernels'])\n"
    )
    env = dict(os.environ, NEUROSENS_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "reference", "(PyTorch)"]


@requires_ext
def test_extension_and_reference_backends_agree(monkeypatch):
    a = torch.randn(6, 7, 4, 4)
    b = a + 0.5 * torch.randn_like(a)
    fused = (ops.neuron_distance(a, b, "l2").sum, ops.neuron_topk(a, b, 3).values, ops.stabilize(a, b, k=3))
    monkeypatch.setattr(ops, "_C", None)
    plain = (ops.neuron_distance(a, b, "l2").sum, ops.neuron_topk(a, b, 3).values, ops.stabilize(a, b, k=3))
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p)


@requires_ext
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
                    reason="graph capture needs the caching allocator (convolutions allocate while capturing)")
def test_stabilize_with_given_indices_captures_in_a_cuda_graph():
    """The SNS step between selections (indices given) neither syncs with the host nor breaks capture."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    x_adv = x + 0.1 * torch.randn_like(x)
    idx = torch.tensor([1, 5, 6], device="cuda")

    def step():
        loss = ops.stabilize(conv(x), conv(x_adv), indices=idx, metric="l2")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    conv.weight.grad.zero_()
    with torch.cuda.graph(graph):
        static_loss = step()
    x.copy_(torch.randn_like(x))
    x_adv.copy_(x + 0.2 * torch.randn_like(x))
    conv.weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    w = conv.weight.detach().double().requires_grad_()
    conv64 = lambda t: torch.nn.functional.conv2d(t.double(), w, conv.bias.detach().double())
    expected = reference.stabilize(conv64(x), conv64(x_adv), indices=idx, metric="l2")[0]
    expected.backward()
    torch.testing.assert_close(static_loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad.double(), w.grad, rtol=1e-3, atol=1e-5)
