"""Numeric edge cases of the fused kernels: long maps, infinities outside the selection, thread and
segment splits, top-k ties, the statistics mask, double backward, and the CUDA launch limits."""
import math

import pytest
import torch

from neurosens import ops, reference

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]
METRICS = ["l1", "l2", "cosine"]
F32_EPS = torch.finfo(torch.float32).eps

requires_ext = pytest.mark.skipif(ops._C is None, reason="the extension is not built")


@pytest.fixture
def threads():
    """Runs the test body with a given number of CPU threads, restoring the previous count."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _rel_err(x, truth):
    return ((x.double() - truth).abs() / truth.abs().clamp_min(1e-30)).max().item()


LONG_MAPS = [
    # name, a, b, channel_dim
    ("ones [1, 2^25, 2]", lambda: torch.ones(1, 2**25, 2), lambda: torch.zeros(1, 2**25, 2), -1),
    ("expanded [1, 1, 2^26]", lambda: torch.ones(1, 1, 1).expand(1, 1, 2**26), lambda: torch.zeros(1, 1, 1).expand(1, 1, 2**26), 1),
    ("random [2, 2^20, 4]", lambda: torch.rand(2, 2**20, 4, generator=torch.Generator().manual_seed(0)),
     lambda: torch.rand(2, 2**20, 4, generator=torch.Generator().manual_seed(1)), -1),
    ("random rows [2, 3, 2^21]", lambda: torch.rand(2, 3, 2**21, generator=torch.Generator().manual_seed(2)),
     lambda: torch.rand(2, 3, 2**21, generator=torch.Generator().manual_seed(3)), 1),
    ("strided [1, 2, 2^12, 2^10]", lambda: torch.rand(1, 2, 2**12, 2**11, generator=torch.Generator().manual_seed(4))[..., ::2],
     lambda: torch.rand(1, 2, 2**12, 2**11, generator=torch.Generator().manual_seed(5))[..., ::2], 1),
]


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,make_a,make_b,cdim", LONG_MAPS, ids=[c[0] for c in LONG_MAPS])
def test_float32_sums_do_not_saturate_on_long_maps(device, name, make_a, make_b, cdim):
    a, b = make_a().to(device), make_b().to(device)
    for metric, relative in (("l1", False), ("l2", False), ("l1", True), ("cosine", False)):
        truth = reference.neuron_distance_per_sample(a.double(), b.double(), metric, cdim, relative)
        if metric == "cosine" and (truth.abs() < 1e-3).any():
            continue  # 1 - cos of nearly parallel maps measures cancellation, not the sums
        ref_err = _rel_err(reference.neuron_distance_per_sample(a, b, metric, cdim, relative), truth)
        got_err = _rel_err(ops.neuron_distance_per_sample(a, b, metric, cdim, relative), truth)
        assert got_err <= 10 * max(ref_err, F32_EPS), (metric, relative, got_err, ref_err)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_gradient_is_exactly_zero_outside_the_selection_whatever_the_values(device, metric, layout):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 9, 4, 5) if layout != "nc" else (3, 9)
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = a + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    b[:, 7] = float("inf")
    a[:, 8] = float("nan")
    b[:, 6] = -float("inf")
    a[:, 6] = float("inf")
    if layout == "channels_last":
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    a, b = a.to(device).requires_grad_(), b.to(device).requires_grad_()
    idx = torch.tensor([0, 1, 4], device=device)
    ops.stabilize(a, b, indices=idx, metric=metric).backward()
    for g in (a.grad, b.grad):
        assert torch.equal(g[:, [2, 3, 5, 6, 7, 8]], torch.zeros_like(g[:, [2, 3, 5, 6, 7, 8]]))
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    reference.stabilize(ra, rb, indices=idx, metric=metric)[0].backward()
    torch.testing.assert_close(a.grad[:, idx], ra.grad[:, idx])
    torch.testing.assert_close(b.grad[:, idx], rb.grad[:, idx])


@requires_ext
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("samples_apart", [False, True])
@pytest.mark.parametrize("N,C,D,num_threads", [(6, 70, 5, 1), (7, 300, 40, 2)])
def test_gradient_of_maps_back_to_back_and_apart(metric, samples_apart, N, C, D, num_threads, threads):
    # One contiguous run per map: the maps of a sample are zeroed in one fill where they lie back
    # to back (contiguous), one by one where they do not (the neuron dim outermost in memory);
    # with two threads the work is split inside a sample.
    threads(num_threads)
    gen = torch.Generator().manual_seed(8)

    def make():
        t = torch.randn(C, N, D, generator=gen, dtype=torch.float64).transpose(0, 1)
        return t if samples_apart else t.contiguous()

    a = make()
    b = a + 0.1 * make()
    idx = torch.tensor([0, 1, 2, 33, 34, 50, C - 1, C - 1])
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    ops.stabilize(x, y, indices=idx, metric=metric).backward()
    assert x.grad.stride() == a.stride()
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    reference.stabilize(ra, rb, indices=idx, metric=metric)[0].backward()
    torch.testing.assert_close(x.grad, ra.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(y.grad, rb.grad, rtol=1e-10, atol=1e-14)
    outside = torch.ones(C, dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(x.grad[:, outside], torch.zeros_like(x.grad[:, outside]))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_l1_gradient_of_a_selected_infinite_neuron_is_its_sign(device):
    a = torch.zeros(2, 3, 4, dtype=torch.float64, device=device)
    b = torch.zeros_like(a)
    b[:, 1] = float("inf")
    a.requires_grad_()
    b.requires_grad_()
    ops.stabilize(a, b, indices=torch.tensor([1], device=device), metric="l1").backward()
    step = 1.0 / (2 * 1 * 4)  # mean over 2 samples, 1 neuron, 4 elements
    torch.testing.assert_close(a.grad[:, 1], torch.full((2, 4), -step, dtype=torch.float64, device=device))
    torch.testing.assert_close(b.grad[:, 1], torch.full((2, 4), step, dtype=torch.float64, device=device))


@requires_ext
def test_second_order_gradient_raises_a_clear_error():
    a = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = (a.detach() + 0.1).requires_grad_()
    loss = ops.stabilize(a, b, indices=torch.tensor([0, 2]), metric="l2")
    (grad_a,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        grad_a.sum().backward()


def _six_sums(a, b, cdim):
    A = a.double().movedim(cdim, 1).reshape(a.shape[0], a.shape[cdim], -1)
    B = b.double().movedim(cdim, 1).reshape(a.shape[0], a.shape[cdim], -1)
    return torch.stack([(A - B).abs().sum(-1), ((A - B) ** 2).sum(-1), (A * B).sum(-1), (A * A).sum(-1),
                        (B * B).sum(-1), A.abs().sum(-1)], -1)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_pair_stats_computes_exactly_the_requested_statistics(device, layout):
    gen = torch.Generator().manual_seed(1)
    shape = (3, 5, 6, 7) if layout != "nc" else (3, 5)
    a = torch.randn(shape, generator=gen)
    b = a + 0.5 * torch.randn(shape, generator=gen)
    if layout == "channels_last":
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    truth = _six_sums(a, b, 1)
    for mask in range(1, 64):
        got = torch.ops.neurosens._pair_stats(a.to(device), b.to(device), 1, mask).cpu()
        for s in range(6):
            if mask >> s & 1:
                torch.testing.assert_close(got[..., s].double(), truth[..., s], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got[..., s], torch.zeros_like(got[..., s])), (mask, s)
        if device != "cpu":
            torch.testing.assert_close(got, torch.ops.neurosens._pair_stats(a, b, 1, mask))


# Shapes whose work is split: CPU tasks of about 2^15 elements that end inside a sample at odd
# remainders; CUDA maps cut into segments (from 256 elements) and batches beyond one grid dim.
SPLIT_SHAPES = [
    ("nchw", (7, 37, 29, 31), 1),
    ("channels_last", (7, 37, 29, 31), 1),
    ("sliced", (5, 23, 61, 67), 1),
    ("nc", (3001, 23), 1),
    ("nc big batch", (70001, 3), 1),
    ("ntc", (5, 1001, 13), -1),
    ("one sample, long maps", (1, 3, 2**16 + 3), 1),
    ("one sample, channels_last", (1, 5, 257, 131), 1),
    ("nchw, aligned rows", (3, 8, 40, 50), 1),
    ("nchw, offset by one element", (3, 8, 40, 50), 1),
    ("one map, aligned with a tail", (1, 1, 2**16 + 5), 1),
    ("channels_last sliced", (4, 37, 29, 31), 1),
    # Short maps, taken eight neurons at a time on the CPU: a tail of 7 elements, a last group of 3.
    ("nchw, short maps", (64, 1003, 3, 5), 1),
    ("nchw, maps shorter than a vector", (64, 515, 2, 2), 1),
]


def _make_split_pair(layout, shape, device):
    """A pair in `layout`, made on the device: a copy there would make strided tensors dense and
    offset ones aligned."""
    gen = torch.Generator().manual_seed(sum(shape))
    n, c = shape[:2]
    full, view = shape, lambda t: t
    if layout == "sliced":
        full, view = (n, 2 * c, shape[2] + 1, 2 * shape[3]), lambda t: t[:, ::2, 1:, 1::2]
    elif layout == "channels_last sliced":
        full = (n, c, shape[2], shape[3] + 2)
        view = lambda t: t.contiguous(memory_format=torch.channels_last)[..., 1:-1]
    elif layout.endswith("channels_last"):
        view = lambda t: t.contiguous(memory_format=torch.channels_last)
    elif layout.endswith("offset by one element"):
        view = _offset_by_one  # rows that no 16-byte load can start: the scalar path of the same layout
    a = torch.randn(full, generator=gen)
    b = a + 0.3 * torch.randn(full, generator=gen)
    return view(a.to(device)), view(b.to(device))


def _offset_by_one(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[1:].copy_(t.reshape(-1))
    return buf[1:].view(t.shape)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("layout,shape,cdim", SPLIT_SHAPES, ids=[f"{c[0]} {list(c[1])}" for c in SPLIT_SHAPES])
def test_values_where_the_work_is_split(device, num_threads, layout, shape, cdim, threads):
    if device == "cuda" and num_threads != 1:
        pytest.skip("CPU threads do not split CUDA work")
    threads(num_threads)
    a, b = _make_split_pair(layout, shape, device)
    for metric in METRICS:
        for relative in ([False, True] if metric != "cosine" else [False]):
            expected = reference.neuron_distance_per_sample(a.double(), b.double(), metric, cdim, relative)
            got = ops.neuron_distance_per_sample(a, b, metric, cdim, relative)
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
            # The batch sums: on the CPU split by neurons, each summed by one task.
            got = ops.neuron_distance(a, b, metric, cdim, relative)
            torch.testing.assert_close(got.sum.double(), expected.sum(0), rtol=1e-4, atol=1e-5)
        C = a.shape[cdim]
        idx = torch.arange(C - 1, -1, -2, device=device)
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = ops.stabilize(x, y, indices=idx, metric=metric, channel_dim=cdim)
        loss.backward()
        rx, ry = a.double().requires_grad_(), b.double().requires_grad_()
        ref = reference.stabilize(rx, ry, indices=idx, metric=metric, channel_dim=cdim)[0]
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
        # Gradients are float32 mixes of a and b (a + b terms that cancel when the maps are
        # near); compare at the scale of the loss's weight, 1 / (samples * neurons * map size).
        scale = 1.0 / (a.shape[0] * idx.numel() * (a.numel() // (a.shape[0] * C)))
        for t, got, want in ((a, x.grad, rx.grad), (b, y.grad, ry.grad)):
            if metric == "cosine":
                # The cosine's gradient is two terms of size weight / ||map|| that cancel (wholly
                # for one-element maps): its float32 error grows as the map's norm shrinks, so
                # compare it times that norm (capped at 1).
                norm = _map_norms(t.double(), cdim).clamp(max=1.0)
                got, want = got.double() * norm, want * norm
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-2 * scale)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("D", [4, 15, 16])
def test_edge_values_in_short_maps(device, metric, D):
    # float32 maps of up to 64 elements go eight neurons at a time on the CPU; one neuron per
    # edge value, and 11 neurons, so the edge values fall in a full group and in a last short one.
    gen = torch.Generator().manual_seed(D)
    a = torch.randn(3, 11, D, generator=gen)
    b = a + 0.3 * torch.randn(3, 11, D, generator=gen)
    b[:, 1, 0] = float("inf")
    a[:, 2, -1] = float("nan")
    a[:, 3, 1], b[:, 3, 1] = float("inf"), float("inf")
    a[:, 4], b[:, 4] = 3e38, -3e38  # differences overflow float32
    a[:, 5], b[:, 5] = 0.0, 0.0
    a[:, 9], b[:, 9] = 1e-30, 0.0  # squares underflow
    a[:, 10, -1] = -float("inf")
    for relative in ([False, True] if metric != "cosine" else [False]):
        got = ops.neuron_distance_per_sample(a.to(device), b.to(device), metric, relative=relative).cpu()
        want = reference.neuron_distance_per_sample(a, b, metric, relative=relative)
        torch.testing.assert_close(got, want, equal_nan=True)
        got = ops.neuron_distance(a.to(device), b.to(device), metric, relative=relative).sum.cpu()
        torch.testing.assert_close(got, want.double().sum(0).float(), equal_nan=True)


# The statistics each metric is computed from (bits of _pair_stats's mask): |a - b|, (a - b)^2,
# and for the cosine a.b, a.a, b.b, |a| and |a - b|.
METRIC_STATS = {"l1": 0b000001, "l2": 0b000010, "cosine": 0b111101}


@requires_ext
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(5, 11, 16), (3, 19, 3, 3), (2, 8, 7), (4, 13, 8, 8)])
def test_stabilize_saves_the_statistics_of_pair_stats_on_short_maps(metric, shape):
    # Short float maps go eight neurons at a time, their statistics rows written a group at once:
    # full groups and last short ones must give the rows _pair_stats gives, bit for bit, and the
    # loss the mean distance over the selection, whether it is given or picked by the same metric.
    gen = torch.Generator().manual_seed(shape[1])
    a = torch.randn(shape, generator=gen)
    b = a + 0.3 * torch.randn(shape, generator=gen)
    a[0, 1], b[0, 1] = 0.0, 0.0  # both maps zero: the cosine's special case
    C = shape[1]
    want_stats = torch.ops.neurosens._pair_stats(a, b, 1, METRIC_STATS[metric])
    per_sample = reference.neuron_distance_per_sample(a.double(), b.double(), metric, 1, False)
    given = torch.tensor([C - 1, 0, 3, 3])
    picked = per_sample.mean(0).topk(5).indices
    for indices, k in ((given, 4), (None, 5)):
        loss, selected, stats = torch.ops.neurosens.stabilize(a, b, indices, k, metric, metric, 1)
        assert torch.equal(stats, want_stats)
        assert sorted(selected.tolist()) == sorted((given if indices is not None else picked).tolist())
        torch.testing.assert_close(loss.double(), per_sample[:, selected].mean(), rtol=1e-5, atol=1e-7)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1, 1), (4, 6, 3, 3), (4, 6, 40)])
def test_l2_gradient_where_the_two_maps_differ_by_a_hair(device, shape):
    # b = a plus steps of 1e-5 of a's size: the l2 gradient is w (a - b) / (D ||a - b||), and
    # forming it as w a / (...) - w b / (...) in float32 loses three digits to cancellation.
    gen = torch.Generator().manual_seed(len(shape))
    a = 1.0 + torch.rand(shape, generator=gen)
    b = a + torch.randint(-8, 9, shape, generator=gen) * 2.0**-16  # exact in float32
    x, y = a.to(device, copy=True).requires_grad_(), b.to(device, copy=True).requires_grad_()
    ops.stabilize(x, y, indices=torch.arange(6, device=device), metric="l2").backward()
    rx, ry = a.double().requires_grad_(), b.double().requires_grad_()
    reference.stabilize(rx, ry, indices=torch.arange(6), metric="l2")[0].backward()
    for got, want in ((x.grad, rx.grad), (y.grad, ry.grad)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@requires_ext
@pytest.mark.parametrize("layout,shape,cdim", SPLIT_SHAPES, ids=[f"{c[0]} {list(c[1])}" for c in SPLIT_SHAPES])
def test_batch_sums_are_the_same_bits_whatever_the_thread_count(layout, shape, cdim, threads):
    a, b = _make_split_pair(layout, shape, "cpu")
    results = []
    for num_threads in (1, 2, 4, 7):
        threads(num_threads)
        results.append((ops.neuron_distance(a, b, "l2", cdim).sum, ops.neuron_topk(a, b, 0.5, channel_dim=cdim)))
    for total, top in results[1:]:
        assert torch.equal(total, results[0][0])
        assert torch.equal(top.values, results[0][1].values) and torch.equal(top.indices, results[0][1].indices)


def _map_norms(t, cdim):
    """Each (sample, neuron) map's Euclidean norm, broadcast over its elements."""
    dims = [d for d in range(t.dim()) if d not in (0, cdim % t.dim())]
    return t.norm(dim=dims, keepdim=True) if dims else t.abs()


def _maps_with_distances(dist, layout, device):
    """a = 0 and b = dist[c] on every element of neuron c's map: l1 distances are exactly dist."""
    dist = torch.as_tensor(dist, dtype=torch.float32)
    if layout == "nc":
        b = dist.expand(3, -1).clone()
    else:
        b = dist.view(1, -1, 1, 1).expand(3, -1, 4, 5).clone()
        if layout == "channels_last":
            b = b.to(memory_format=torch.channels_last)
    return torch.zeros_like(b).to(device), b.to(device)


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nc", "nchw", "channels_last"])
def test_topk_ties_go_to_the_lower_index(device, layout, backend, monkeypatch):
    if backend == "extension" and ops._C is None:
        pytest.skip("the extension is not built")
    if backend == "reference":
        monkeypatch.setattr(ops, "_C", None)
    a, b = _maps_with_distances([1, 2, 2, 0, 2, 0, 0, 1], layout, device)
    top = ops.neuron_topk(a, b, 4)
    assert top.indices.tolist() == [1, 2, 4, 0]
    assert top.values.tolist() == [2, 2, 2, 1]
    assert ops.neuron_topk(a, b, 5, largest=False).indices.tolist() == [3, 5, 6, 0, 7]
    assert ops.stabilize(a, b, k=3, return_indices=True)[1].tolist() == [1, 2, 4]
    # Many dead neurons (distance exactly 0) and a few live ones.
    dist = torch.zeros(3000)
    dist[[2999, 1500, 7]] = 1.0
    a, b = _maps_with_distances(dist, layout, device)
    assert ops.neuron_topk(a, b, 8).indices.tolist() == [7, 1500, 2999, 0, 1, 2, 3, 4]
    assert ops.neuron_topk(a, b, 300, largest=False).indices.tolist() == [i for i in range(301) if i != 7]
    assert ops.stabilize(a, b, k=6, return_indices=True)[1].tolist() == [7, 1500, 2999, 0, 1, 2]


@requires_ext
@pytest.mark.parametrize("select_metric", METRICS)
def test_stabilize_selects_a_nan_neuron_first(select_metric):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 7, 5, generator=gen)
    b = a + torch.randn(4, 7, 5, generator=gen)
    a[2, 5, 1] = float("nan")
    means = reference.neuron_distance_per_sample(a.double(), b.double(), select_metric).mean(0)
    expected = torch.sort(means, descending=True, stable=True).indices[:3].tolist()
    assert expected[0] == 5
    loss, idx = ops.stabilize(a, b, k=3, metric="l1", select_metric=select_metric, return_indices=True)
    assert idx.tolist() == expected
    assert torch.isnan(loss)


def _launch(kernel, N, C, D, sms):
    grid, threads, segs = ops._C.launch_config(kernel, N, C, D, sms)
    return grid, threads, segs


LAUNCH_CASES = [
    (N, C, D, sms)
    for N, C, D in [(1, 1, 1), (2**31, 1, 1), (65535, 1, 1), (65536, 3, 7), (2**20, 4096, 1), (1, 1, 2**40),
                    (1, 2**31, 1), (3, 5, 2**33), (128, 256, 8 * 8), (256, 256, 56 * 56), (2**31, 1, 2**20)]
    for sms in (1, 132)
]


@requires_ext
@pytest.mark.parametrize("N,C,D,sms", LAUNCH_CASES)
def test_launch_configurations_stay_within_cuda_limits_and_cover_the_work(N, C, D, sms):
    for kernel in ("stats_columns", "stats_rows", "elementwise"):
        (gx, gy, gz), threads, segs = _launch(kernel, N, C, D, sms)
        assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535, kernel
        assert 32 <= threads <= 1024 and threads % 32 == 0, kernel
        seg_len = -(-D // segs)
        assert 1 <= segs and segs * seg_len >= D and (segs - 1) * seg_len < D, "a segment is empty or D is not covered"
        # Segments only to fill the GPU: their partial sums stay within a few waves of threads.
        assert segs == 1 or segs * N * C < sms * 2048 + N * C, kernel
        if kernel == "stats_columns":
            assert gx * threads >= C and gz == segs and gy <= N  # samples beyond gy are looped over
        elif kernel == "stats_rows":
            assert gy == segs and gz == 1 and gx * (threads // 32) < N * C + threads // 32  # maps beyond are looped over
        else:
            assert gy == gz == 1 and gx * threads <= max(N * C * D, threads) + threads - 1


@requires_ext
def test_launch_configuration_of_a_batch_beyond_one_grid_dim():
    # [70001, 3]: samples loop on grid y (65535 at most) instead of being refused.
    (gx, gy, gz), threads, segs = _launch("stats_columns", 70001, 3, 1, 132)
    assert (gx, gy, gz, threads, segs) == (1, 65535, 1, 32, 1)
    with pytest.raises(ValueError, match="unknown kernel"):
        _launch("nope", 1, 1, 1, 1)
