"""Where the GPU time of the fused ops goes: a torch.profiler table of kernels per op and input.

For each of neuron_topk and stabilize forward + backward, on [256, 256, 56, 56] in float32 and
bfloat16, NCHW and channels_last, and on a tiny [2, 8] input (its fixed cost): 10 calls after 3
warm-ups, kernels sorted by GPU time. The tables go to stdout and to OUT/profile_DEVICE.txt.

Then stabilize forward + backward in float32 NCHW exactly as bench_ops.py times it (its four
variants interleaved, a synchronize around each call), as a table sorted by host time and a
Chrome trace, OUT/trace_DEVICE.json: under bench_ops the fused call takes about twice its
kernels' time, and the trace shows where the rest goes.

    python benchmarks/profile_ops.py --device cuda --out benchmarks/results
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench_ops import check_device, make_inputs, stabilize_variants
from neurosens import ops

LARGE = (256, 256, 56, 56)
CASES = [((2, 8), torch.float32, "contiguous")] + [
    (LARGE, dtype, fmt) for dtype in (torch.float32, torch.bfloat16) for fmt in ("contiguous", "channels_last")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    check_device(parser, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = "device_time_total" if args.device == "cuda" else "cpu_time_total"
    sections = []
    for shape, dtype, fmt in CASES:
        a, b = make_inputs(shape, dtype, torch.device(args.device), fmt)
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        k = max(1, shape[1] // 10)

        def stabilize_step():
            ops.stabilize(x, y, k=k).backward()
            x.grad = y.grad = None

        for name, fn in (("neuron_topk", lambda: ops.neuron_topk(a, b, k)), ("stabilize fwd+bwd", stabilize_step)):
            for _ in range(3):
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.calls):
                    fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            title = f"##### {name} {list(shape)} {str(dtype).removeprefix('torch.')} {fmt} ({args.calls} calls)"
            table = prof.key_averages().table(sort_by=sort_by, row_limit=16, max_name_column_width=60)
            print(f"\n{title}\n{table}", flush=True)
            sections.append(f"{title}\n{table}")
    os.makedirs(args.out, exist_ok=True)
    sections.append(trace_as_benchmarked(args, activities))
    with open(os.path.join(args.out, f"profile_{args.device}.txt"), "w") as f:
        f.write("\n\n".join(sections) + "\n")


def trace_as_benchmarked(args, activities):
    """stabilize fwd+bwd as bench_ops.py times it: variants interleaved, synchronized per call."""
    a, b = make_inputs(LARGE, torch.float32, torch.device(args.device))
    variants = stabilize_variants(a, b, LARGE[1] // 10)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for fn in variants.values():
        fn()
    with profile(activities=activities) as prof:
        for _ in range(3):
            for fn in variants.values():
                sync()
                fn()
                sync()
    prof.export_chrome_trace(os.path.join(args.out, f"trace_{args.device}.json"))
    title = f"##### stabilize fwd+bwd {list(LARGE)} float32 contiguous, as benchmarked ({', '.join(variants)}; 3 rounds)"
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    print(f"\n{title}\n{table}", flush=True)
    return f"{title}\n{table}"


if __name__ == "__main__":
    main()
