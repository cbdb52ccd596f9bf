"""Fused ops against the eager reference, torch.compile of the reference, and the read floor.

For each activation shape (CIFAR ResNet-18 and MNIST CNN layers at batch 128) it times
  * neuron_topk (forward): one pass over a and b, then top-k of the per-neuron means;
  * stabilize forward + backward: the SNS loss and both input gradients;
and the floor: reading a and b once (a.sum(); b.sum()) for the forward, plus reading them again
and writing two gradients for the forward + backward. The device's copy bandwidth (one large
tensor copied into another) is measured once; each fused op's bytes moved over its time is given
as a fraction of it. Times are medians after warm-up; the ratios are what to compare across
machines. Writes JSON and a markdown table to benchmarks/results/.

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
from neurosens import ops, reference

SHAPES = [(128, 64, 32, 32), (128, 256, 8, 8), (128, 512, 4, 4), (128, 200)]
LARGE_SHAPES = [(256, 256, 56, 56)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def topk_variants(a, b, k):
    compiled = torch.compile(reference.neuron_topk)
    return {
        "floor": lambda: (a.sum(), b.sum()),
        "fused": lambda: ops.neuron_topk(a, b, k),
        "eager": lambda: reference.neuron_topk(a, b, k),
        "compiled": lambda: compiled(a, b, k),
    }


def stabilize_variants(a, b, k):
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()

    def fused():
        ops.stabilize(xa, xb, k=k).backward()
        xa.grad = xb.grad = None

    def eager():
        reference.stabilize(xa, xb, k=k)[0].backward()
        xa.grad = xb.grad = None

    compiled_loss = torch.compile(lambda x, y: reference.stabilize(x, y, k=k)[0])

    def compiled():
        compiled_loss(xa, xb).backward()
        xa.grad = xb.grad = None

    def floor():
        a.sum(), b.sum()
        ga.copy_(a)
        gb.copy_(b)

    return {"floor": floor, "fused": fused, "eager": eager, "compiled": compiled}


PEAK_SCRIPT = r"""
import sys, torch
from neurosens import ops, reference
shape = tuple(int(s) for s in sys.argv[1].split(","))
dtype = getattr(torch, sys.argv[2])
fn = {"fused": ops.neuron_topk, "eager": reference.neuron_topk}[sys.argv[3]]
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
        fn = {"fused": ops.neuron_topk, "eager": reference.neuron_topk}[variant]
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
        [sys.executable, "-c", PEAK_SCRIPT, ",".join(map(str, shape)), dtype_name, variant],
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--large", action="store_true", help=f"also time {LARGE_SHAPES} (several GB of memory)")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="layout of the 4-D activations")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc malloc as the neurosens command does (neurosens.cpu_memory); "
                             "peak memory is still measured with the default allocator")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.keep_freed_memory:
        from neurosens.cpu_memory import keep_freed_memory

        keep_freed_memory()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    copy_bw = copy_bandwidth(device, args.repeats)
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    for shape in SHAPES + (LARGE_SHAPES if args.large else []):
        a, b = make_inputs(shape, dtype, device, args.memory_format)
        k = max(1, shape[1] // 10)
        for op, variants in (("neuron_topk", topk_variants(a, b, k)), ("stabilize fwd+bwd", stabilize_variants(a, b, k))):
            times = {name: timed(fn, device, args.repeats) for name, fn in variants.items()}
            row = {"op": op, "shape": list(shape), "dtype": args.dtype, "memory_format": args.memory_format, "input_mb": 2 * a.numel() * a.element_size() / 2**20}
            row.update({f"{name}_ms": t * 1e3 for name, t in times.items()})
            row["fused_vs_floor"] = times["fused"] / times["floor"]
            row["eager_over_fused"] = times["eager"] / times["fused"]
            row["compiled_over_fused"] = times["compiled"] / times["fused"]
            # topk reads a and b; stabilize forward + backward reads them twice and writes two gradients
            moved = (2 if op == "neuron_topk" else 6) * a.numel() * a.element_size()
            row["fused_of_copy_bandwidth"] = moved / times["fused"] / copy_bw
            if op == "neuron_topk":
                for variant in ("fused", "eager"):
                    peak = peak_extra_bytes(shape, args.dtype, variant, device)
                    row[f"{variant}_peak_extra_mb"] = None if peak is None else peak / 2**20
            rows.append(row)
            print(f"{op:18s} {str(list(shape)):18s} fused {times['fused']*1e3:8.2f} ms  floor {times['floor']*1e3:8.2f} ms  "
                  f"eager {times['eager']*1e3:8.2f} ms  compiled {times['compiled']*1e3:8.2f} ms", flush=True)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "copy_bandwidth_gb_s": copy_bw / 1e9,
        "torch": torch.__version__,
        "neurosens": neurosens.__version__,
        "backend": ops.info(),
        "keep_freed_memory": args.keep_freed_memory,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ops_{device.type}_{args.dtype}" + ("_kept" if args.keep_freed_memory else "")
                        + ("_channels_last" if args.memory_format == "channels_last" else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)
    table = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(f"Device: {env['device']} ({env['threads']} threads), torch {env['torch']}, {args.dtype}"
                + (", freed memory kept" if args.keep_freed_memory else "")
                + f"; copy bandwidth {copy_bw / 1e9:.1f} GB/s\n\n{table}")
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
