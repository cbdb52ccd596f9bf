"""Where the GPU time of the fused ops goes: a torch.profiler table of kernels per op and input.

For each of neuron_topk and stabilize forward + backward, on [256, 256, 56, 56] in float32 and
bfloat16, NCHW and channels_last, and on a tiny [2, 8] input (its fixed cost): 10 calls after 3
warm-ups, kernels sorted by GPU time. The tables go to stdout and to OUT/profile_DEVICE.txt.

    python benchmarks/profile_ops.py --device cuda --out benchmarks/results
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench_ops import check_device
from neurosens import ops

LARGE = (256, 256, 56, 56)
CASES = [((2, 8), torch.float32, "contiguous")] + [
    (LARGE, dtype, fmt) for dtype in (torch.float32, torch.bfloat16) for fmt in ("contiguous", "channels_last")]


def make_pair(shape, dtype, fmt, device):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, device=device, generator=gen)
    b = (a + 0.1 * torch.randn(shape, device=device, generator=gen)).to(dtype)
    a = a.to(dtype)
    if fmt == "channels_last":
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    return a, b


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
        a, b = make_pair(shape, dtype, fmt, args.device)
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
    with open(os.path.join(args.out, f"profile_{args.device}.txt"), "w") as f:
        f.write("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
