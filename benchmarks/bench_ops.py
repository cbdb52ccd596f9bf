"""Fused ops against the best straightforward eager PyTorch, its torch.compile, and the read floor.

For each activation shape (CIFAR ResNet-18 and MNIST CNN layers at batch 128) it times
  * neuron_distance (forward): one pass over a and b, the per-neuron sums over the batch;
  * neuron_topk (forward): the same pass, then top-k of the per-neuron means;
  * stabilize forward + backward: the SNS loss (l1) and both input gradients;
and the floor: reading a and b once (a.sum(); b.sum()) for the forward, plus reading them again
and writing two gradients for the forward + backward. The fixed cost of a call (argument checks,
dispatch, allocations) is timed on a tiny input. The baselines are written here, as one
would by hand: one pass of per-sample, per-neuron distances, from which the top-k is selected
and (for stabilize) the loss taken, so nothing is computed twice. "compiled" is torch.compile of
that same code, built afresh for each shape with static shapes (dynamic=False), so every shape
gets its own best code. The variants of a shape run interleaved (one call of each in turn), so
a busy moment on the machine hits them alike. The device's copy bandwidth (one large tensor
copied into another) is measured once; each fused op's bytes moved over its time is given as a
fraction of it. Times are medians after warm-up; the ratios are what to compare across machines.
Writes JSON and a markdown table, with the git commit, machine, torch version and command, to
benchmarks/results/.

    python benchmarks/bench_ops.py                 # CPU, float32
    python benchmarks/bench_ops.py --keep-freed-memory   # CPU, glibc keeps freed blocks (as the CLI does)
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --large   # adds [256, 256, 56, 56]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import neurosens
from neurosens import ops

SHAPES = [(128, 64, 32, 32), (128, 256, 8, 8), (128, 512, 4, 4), (128, 200)]
LARGE_SHAPES = [(256, 256, 56, 56)]
# Small enough that a call costs only what every call costs (checks, dispatch, allocation).
TINY_SHAPE = (2, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(parser, device):
    """One line, not a traceback, when the device asked for is not there."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")


def timed(fn, device, repeats, warmup=3):
    return timed_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def device_allocations(device):
    """cudaMalloc calls so far by the caching allocator (0 off CUDA): a timed call that makes them
    pays for the allocation, not for its kernels."""
    return torch.cuda.memory_stats(device).get("num_device_alloc", 0) if device.type == "cuda" else 0


def timed_interleaved(fns, device, repeats, warmup=3, allocations=None):
    """Median seconds of each function, timed one call of each in turn. ``allocations``, a dict,
    receives each function's device allocations per timed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    allocs = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            before = device_allocations(device)
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            allocs[name] += device_allocations(device) - before
    if allocations is not None:
        allocations.update({name: n / repeats for name, n in allocs.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device, repeats, nbytes=1 << 30):
    """Bytes per second of copying one tensor into another (each byte read once, written once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats)


def make_inputs(shape, dtype, device, memory_format="contiguous"):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = (a.float() + 0.1 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    if memory_format == "channels_last" and len(shape) == 4:
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    return a, b


def eager_distances(a, b):
    """[N, C] mean absolute difference of each neuron's map, accumulated in float32."""
    diff = (a.float() - b.float()).abs()
    return diff.flatten(2).mean(2) if diff.dim() > 2 else diff


def eager_distance(a, b):
    return eager_distances(a, b).sum(0)


def eager_topk(a, b, k):
    return torch.topk(eager_distances(a, b).mean(0), k)


def eager_stabilize(a, b, k):
    """The SNS l1 term in one pass: the same distances select the neurons and give the loss."""
    dist = eager_distances(a, b)
    picked = torch.topk(dist.detach().mean(0), k).indices
    return dist[:, picked].mean()


def compiled_fresh(fn):
    """torch.compile with static shapes and no cache carried over from another shape."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def distance_variants(a, b, k):
    compiled = compiled_fresh(eager_distance)
    return {
        "floor": lambda: (a.sum(), b.sum()),
        "fused": lambda: ops.neuron_distance(a, b),
        "eager": lambda: eager_distance(a, b),
        "compiled": lambda: compiled(a, b),
    }


def topk_variants(a, b, k):
    compiled = compiled_fresh(eager_topk)
    return {
        "floor": lambda: (a.sum(), b.sum()),
        "fused": lambda: ops.neuron_topk(a, b, k),
        "eager": lambda: eager_topk(a, b, k),
        "compiled": lambda: compiled(a, b, k),
    }


def stabilize_variants(a, b, k):
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    compiled_loss = compiled_fresh(eager_stabilize)

    def backward_of(loss_fn):
        def run():
            loss_fn(xa, xb, k).backward()
            xa.grad = xb.grad = None
        return run

    def floor():
        a.sum(), b.sum()
        ga.copy_(a)
        gb.copy_(b)

    return {"floor": floor, "fused": backward_of(lambda x, y, k: ops.stabilize(x, y, k=k)),
            "eager": backward_of(eager_stabilize), "compiled": backward_of(compiled_loss)}


def fixed_costs(device, repeats, calls=200):
    """Microseconds per call of each op on a TINY_SHAPE input: the fixed part of its cost."""
    a, b = make_inputs(TINY_SHAPE, torch.float32, device)
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()

    def forward_backward():
        ops.stabilize(xa, xb, k=1).backward()
        xa.grad = xb.grad = None

    fns = {"neuron_topk": lambda: ops.neuron_topk(a, b, 1), "neuron_distance": lambda: ops.neuron_distance(a, b),
           "stabilize": lambda: ops.stabilize(a, b, k=1), "stabilize fwd+bwd": forward_backward}
    loops = {name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in fns.items()}
    return {name: t / calls * 1e6 for name, t in timed_interleaved(loops, device, repeats).items()}


def check_baselines(a, b, k):
    """The baselines compute what the fused ops do (same loss, same neurons)."""
    xa, xb = a.float().requires_grad_(), b.float().requires_grad_()
    fused, picked = ops.stabilize(xa, xb, k=k, return_indices=True)
    eager = eager_stabilize(xa, xb, k)
    torch.testing.assert_close(eager, fused.to(eager.dtype), rtol=1e-4, atol=1e-6)
    assert sorted(eager_topk(a, b, k).indices.tolist()) == sorted(picked.tolist())
    torch.testing.assert_close(eager_distance(a, b), ops.neuron_distance(a, b).sum, rtol=1e-4, atol=1e-6)


PEAK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[4])
from bench_ops import eager_topk
from neurosens import ops
shape = tuple(int(s) for s in sys.argv[1].split(","))
dtype = getattr(torch, sys.argv[2])
fn = {"fused": ops.neuron_topk, "eager": eager_topk}[sys.argv[3]]
a = torch.randn(shape).to(dtype); b = a + 0.1
k = max(1, shape[1] // 10)
fn(a, b, k)  # warm-up: code pages, thread pool

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
base = rss("VmRSS:")
fn(a, b, k)
print(rss("VmHWM:") - base)
"""


def peak_extra_bytes(shape, dtype_name, variant, device):
    """Peak memory the op allocates on top of its inputs (CPU: resident set; CUDA: allocator)."""
    if device.type == "cuda":
        a, b = make_inputs(shape, DTYPES[dtype_name], device)
        fn = {"fused": ops.neuron_topk, "eager": eager_topk}[variant]
        k = max(1, shape[1] // 10)
        fn(a, b, k)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(a, b, k)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, ",".join(map(str, shape)), dtype_name, variant,
         os.path.dirname(os.path.abspath(__file__))],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip())


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """The checkout's commit, with "+changes" when the working tree differs from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        # Results written by an earlier run of the same code do not make the code differ.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
                               cwd=os.path.dirname(here), capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if dirty else "")


def environment(device, argv=None):
    """What a result depends on: code, machine, library versions and the command that made it."""
    device = torch.device(device)
    return {
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "neurosens": neurosens.__version__,
        "backend": neurosens.info(),
        "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]))] + list(sys.argv[1:] if argv is None else argv)),
    }


def header(env):
    return (f"Device: {env['device']} ({env['cpu_cores']} cores, {env['threads']} threads), torch {env['torch']}, "
            f"commit {env['git_commit'][:12]}{'+changes' if env['git_commit'].endswith('+changes') else ''}; "
            f"`{env['command']}`")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--large", action="store_true", help=f"also time {LARGE_SHAPES} (several GB of memory)")
    parser.add_argument("--large-only", action="store_true", help=f"time only {LARGE_SHAPES}")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="layout of the 4-D activations")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc malloc as the neurosens command does (neurosens.cpu_memory); "
                             "peak memory is still measured with the default allocator")
    parser.add_argument("--threads", type=int, help="CPU threads (on a busy machine, 1 keeps the small shapes from "
                                                     "waiting on a descheduled worker thread)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from neurosens.cpu_memory import keep_freed_memory

        keep_freed_memory()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    copy_bw = copy_bandwidth(device, args.repeats)
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    fixed = fixed_costs(device, args.repeats)
    print("fixed cost per call (us): " + ", ".join(f"{name} {us:.1f}" for name, us in fixed.items()), flush=True)
    rows = []
    shapes = LARGE_SHAPES if args.large_only else SHAPES + (LARGE_SHAPES if args.large else [])
    for shape in shapes:
        a, b = make_inputs(shape, dtype, device, args.memory_format)
        k = max(1, shape[1] // 10)
        check_baselines(a, b, k)
        for op, make in (("neuron_distance", distance_variants), ("neuron_topk", topk_variants),
                         ("stabilize fwd+bwd", stabilize_variants)):
            allocations = {}
            times = timed_interleaved(make(a, b, k), device, args.repeats, allocations=allocations)
            row = {"op": op, "shape": list(shape), "dtype": args.dtype, "memory_format": args.memory_format,
                   "input_mb": 2 * a.numel() * a.element_size() / 2**20, "device_allocations_per_call": allocations}
            row.update({f"{name}_ms": t * 1e3 for name, t in times.items()})
            row["fused_vs_floor"] = times["fused"] / times["floor"]
            row["eager_over_fused"] = times["eager"] / times["fused"]
            row["compiled_over_fused"] = times["compiled"] / times["fused"]
            # the forwards read a and b; stabilize forward + backward reads them twice and writes two gradients
            moved = (6 if op == "stabilize fwd+bwd" else 2) * a.numel() * a.element_size()
            row["fused_of_copy_bandwidth"] = moved / times["fused"] / copy_bw
            if op == "neuron_topk":
                for variant in ("fused", "eager"):
                    peak = peak_extra_bytes(shape, args.dtype, variant, device)
                    row[f"{variant}_peak_extra_mb"] = None if peak is None else peak / 2**20
            rows.append(row)
            print(f"{op:18s} {str(list(shape)):18s} fused {times['fused']*1e3:8.2f} ms  floor {times['floor']*1e3:8.2f} ms  "
                  f"eager {times['eager']*1e3:8.2f} ms  compiled {times['compiled']*1e3:8.2f} ms"
                  + (f"  device allocations per call {allocations}" if device.type == "cuda" else ""), flush=True)

    env = environment(device) | {"dtype": args.dtype, "repeats": args.repeats, "copy_bandwidth_gb_s": copy_bw / 1e9,
                                 "keep_freed_memory": args.keep_freed_memory, "fixed_cost_us": fixed,
                                 "fixed_cost_shape": list(TINY_SHAPE)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ops_{device.type}_{args.dtype}" + ("_kept" if args.keep_freed_memory else "")
                        + ("_channels_last" if args.memory_format == "channels_last" else "")
                        + (f"_{args.threads}thread" if args.threads else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)
    table = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(f"{header(env)}\n\n{args.dtype}" + (", freed memory kept" if args.keep_freed_memory else "")
                + f"; median of {args.repeats} interleaved runs; copy bandwidth {copy_bw / 1e9:.1f} GB/s\n\n{table}\n"
                + f"Fixed cost of a call (input {list(TINY_SHAPE)}), us: "
                + ", ".join(f"{name} {us:.1f}" for name, us in fixed.items()) + "\n")
    print(table)


def markdown(rows):
    lines = [
        "| op | shape | fused ms | floor ms | eager ms | compiled ms | fused / floor | eager / fused | compiled / fused | fused, of copy bandwidth | peak extra MB (fused / eager) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = ""
        if r.get("fused_peak_extra_mb") is not None:
            peak = f"{r['fused_peak_extra_mb']:.2f} / {r['eager_peak_extra_mb']:.1f} (inputs {r['input_mb']:.0f})"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['fused_ms']:.2f} | {r['floor_ms']:.2f} | {r['eager_ms']:.2f} | "
            f"{r['compiled_ms']:.2f} | {r['fused_vs_floor']:.2f} | {r['eager_over_fused']:.1f} | "
            f"{r['compiled_over_fused']:.2f} | {100 * r['fused_of_copy_bandwidth']:.0f}% | {peak} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
