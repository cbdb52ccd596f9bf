"""Streaming sensitivity measurement: memory against data set size, and speed against storing activations.

memory: peak resident memory (RSS) of measuring N MNIST-sized samples (1x28x28, MNIST CNN, every
  conv/linear layer), each N in a fresh subprocess. Batches are generated on the fly, so the only
  thing that could grow with N is the measurement itself. For contrast, the same for the
  straightforward approach that keeps every activation of both passes and reduces at the end.
speed: a CIFAR ResNet-18 (every Conv2d, 32x32 synthetic images, adversarial inputs given),
  timed three ways at the same batch size on the same model:
    * streaming: NeuronSensitivity, one eval forward of [x; x_adv], fused per-layer reduction;
    * stored: two forwards whose conv outputs are kept, then reduced in eager PyTorch
      ((a - b).abs().mean over each map, summed over the batch), per batch;
    * forward only / two forwards: the bare forward of [x; x_adv], and of x then x_adv, with no
      hooks: the floor of each. What a measurement adds to its own floor is its real cost.
  Both measurements are checked to agree. The variants run interleaved, in rounds; after each
  round from --repeats on, the paired per-round ratios (stored / streaming, and streaming over
  its forward-only floor) get a 95% confidence interval, and the rounds go on until each interval
  excludes 1 or --max-repeats is reached, in which case the result says it cannot tell.

Writes JSON and a markdown table, with the git commit, machine, torch version and command, to
benchmarks/results/.

    python benchmarks/bench_measure.py                       # the full run
    python benchmarks/bench_measure.py --images 512 --samples 1000 2000   # a quick one
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from bench_ops import check_device, environment, header
from neurosens.sensitivity import NeuronSensitivity

EPS = 8 / 255


def synthetic_pair(n, shape, seed):
    """Images in [0, 1] and an L-inf perturbation of them, as an attack would give."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen)
    noise = torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
    return x, (x + EPS * noise).clamp(0, 1)


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss():
    """Start the peak-RSS counter afresh (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StoredActivations:
    """The straightforward measurement: keep each layer's outputs of the benign and the adversarial
    forward, then reduce them in eager PyTorch."""

    def __init__(self, model, modules):
        self.model, self.modules = model, modules
        self.sums, self.count, self.kept = {}, 0, {}

    @torch.no_grad()
    def run_pass(self, x):
        outs = {}
        handles = [m.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n, m in self.modules.items()]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        return outs

    @staticmethod
    def reduce(a, b):
        return (a - b).abs().flatten(2).mean(2).sum(0).double() if a.dim() > 2 else (a - b).abs().sum(0).double()

    @torch.no_grad()
    def update(self, x, x_adv):
        benign, adversarial = self.run_pass(x), self.run_pass(x_adv)
        for name in self.modules:
            part = self.reduce(benign[name], adversarial[name])
            self.sums[name] = self.sums[name] + part if name in self.sums else part
        self.count += x.shape[0]

    @torch.no_grad()
    def keep(self, x, x_adv):
        """Keep both passes' activations of every batch, to reduce once at the end."""
        for name, (a, b) in zip(self.modules, zip(self.run_pass(x).values(), self.run_pass(x_adv).values())):
            self.kept.setdefault(name, []).append((a, b))
        self.count += x.shape[0]

    def finish_kept(self):
        for name, pairs in self.kept.items():
            a = torch.cat([p[0] for p in pairs])
            b = torch.cat([p[1] for p in pairs])
            self.sums[name] = self.reduce(a, b)
        self.kept.clear()

    def means(self):
        return {name: s / self.count for name, s in self.sums.items()}


def memory_child(args):
    """One memory measurement in this fresh process; prints a JSON line."""
    from neurosens.models import build_model

    torch.manual_seed(0)
    model = build_model(args.mnist_arch, num_classes=10, in_channels=1, input_size=28).eval()
    shape = (1, 28, 28)
    meter = NeuronSensitivity(model, "auto")
    stored = StoredActivations(model, meter.modules)
    for i in range(4):  # kernels and the allocator settle on a few batches first
        meter.update(*synthetic_pair(args.batch, shape, seed=2**31 - 1 - i))
    meter.reset()
    baseline = current_rss_mb()
    fresh_peak = reset_peak_rss()
    start = time.perf_counter()
    for i, lo in enumerate(range(0, args.memory_child, args.batch)):
        x, x_adv = synthetic_pair(min(args.batch, args.memory_child - lo), shape, seed=i)
        if args.method == "streaming":
            meter.update(x, x_adv)
        else:
            stored.keep(x, x_adv)
    if args.method == "streaming":
        samples = meter.compute().meta["samples"]
    else:
        stored.finish_kept()
        samples = stored.count
    seconds = time.perf_counter() - start
    print(json.dumps({
        "method": args.method,
        "samples": samples,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "peak_is_since_baseline": fresh_peak,
        "seconds": seconds,
    }))


def run_memory(args):
    rows = []
    plan = [("streaming", n) for n in args.samples] + [("stored", n) for n in args.stored_samples]
    for method, n in plan:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--method", method,
               "--batch", str(args.mnist_batch), "--mnist-arch", args.mnist_arch]
        # A fixed mmap threshold stops glibc from moving it as tensors come and go, so large
        # buffers are always returned on free and the peak RSS is repeatable to a few pages.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["peak_extra_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
        rows.append(row)
        print(f"memory {method:9s} {n:6d} samples: peak RSS {row['peak_rss_mb']:8.1f} MB "
              f"(+{row['peak_extra_mb']:.1f} MB over the warmed-up process) in {row['seconds']:.1f} s", flush=True)
    return rows


# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; 2.0 beyond is close enough.
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23]


def paired_ratio(numerator, denominator):
    """Mean of the per-round ratios and its 95% confidence interval (None below two rounds)."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    mean = statistics.fmean(ratios)
    if len(ratios) < 2:
        return {"rounds": len(ratios), "ratio": mean, "ci95": None}
    half = (T95[len(ratios) - 2] if len(ratios) - 1 <= len(T95) else 2.0) * statistics.stdev(ratios) / len(ratios) ** 0.5
    return {"rounds": len(ratios), "ratio": mean, "ci95": [mean - half, mean + half]}


def told(comparison):
    return comparison["ci95"] is not None and not comparison["ci95"][0] <= 1.0 <= comparison["ci95"][1]


def verdict(comparison, slower, faster):
    """What a ratio slower/faster says, or that the rounds could not tell the two apart."""
    lo, hi = comparison["ci95"] or (float("nan"), float("nan"))
    text = f"{comparison['ratio']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {comparison['rounds']} rounds)"
    if not told(comparison):
        return f"cannot tell {faster} from {slower}: {text} includes 1"
    return f"{faster} is faster: {text}" if comparison["ratio"] > 1 else f"{slower} is faster: {text}"


def run_speed(args):
    from neurosens.models import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.cifar_arch, num_classes=10, in_channels=3, input_size=32).eval().to(device)
    meter = NeuronSensitivity(model, nn.Conv2d)
    stored = StoredActivations(model, meter.modules)
    batches = [tuple(t.to(device) for t in synthetic_pair(min(args.batch, args.images - lo), (3, 32, 32), seed=lo))
               for lo in range(0, args.images, args.batch)]

    def sync():  # a GPU runs behind the host: time what it has done, not what was queued
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def forward_only():
        for x, x_adv in batches:
            model(torch.cat([x, x_adv]))

    @torch.no_grad()
    def two_forwards():
        for x, x_adv in batches:
            model(x)
            model(x_adv)

    def streaming():
        meter.reset()
        for x, x_adv in batches:
            meter.update(x, x_adv)

    def stored_run():
        stored.sums, stored.count = {}, 0
        for x, x_adv in batches:
            stored.update(x, x_adv)

    variants = {"forward only": forward_only, "two forwards": two_forwards, "streaming": streaming, "stored": stored_run}
    with torch.no_grad():
        warm_x, warm_adv = batches[0]
        model(torch.cat([warm_x, warm_adv]))
        meter.update(warm_x, warm_adv)
        stored.update(warm_x, warm_adv)
    times = {name: [] for name in variants}
    pairs = {"stored / streaming": ("stored", "streaming"), "streaming / forward only": ("streaming", "forward only")}
    while True:  # interleaved, so a busy moment on a shared machine hits every variant alike
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            print(f"speed  {name:12s} {args.images} images: {times[name][-1]:7.2f} s", flush=True)
        comparisons = {key: paired_ratio(times[n], times[d]) for key, (n, d) in pairs.items()}
        rounds = len(times["streaming"])
        if rounds >= args.max_repeats or (rounds >= args.repeats and all(map(told, comparisons.values()))):
            break
    for key, (n, d) in pairs.items():
        comparisons[key]["verdict"] = verdict(comparisons[key], n, d)
        print(f"speed  {key}: {comparisons[key]['verdict']}", flush=True)
    best = {name: min(t) for name, t in times.items()}
    report = meter.compute()
    expected = stored.means()
    # Compared on the host: the eager sums stay on the device the activations were on.
    pairs = {n: (report[n].cpu(), expected[n].cpu()) for n in expected}
    max_rel = max(((r - e).abs() / e.abs().clamp_min(1e-12)).max().item() for r, e in pairs.values())
    return {
        "arch": args.cifar_arch,
        "device": str(device),
        "images": args.images,
        "batch": args.batch,
        "layers": len(meter.modules),
        "neurons": sum(v.numel() for v in report.sensitivity.values()),
        "seconds": best,
        "all_seconds": times,
        "speedup": best["stored"] / best["streaming"],
        "comparisons": comparisons,
        # What each measurement adds to its own forward passes: [x; x_adv] at once, or x then x_adv.
        "overhead_seconds": {"streaming": best["streaming"] - best["forward only"], "stored": best["stored"] - best["two forwards"]},
        "max_relative_difference": max_rel,
    }


def markdown(memory, speed):
    lines = ["| memory: method | samples | peak RSS MB | peak over warmed-up process MB | seconds |", "|---|---:|---:|---:|---:|"] if memory else []
    for r in memory:
        lines.append(f"| {r['method']} | {r['samples']:,} | {r['peak_rss_mb']:.1f} | {r['peak_extra_mb']:.1f} | {r['seconds']:.1f} |")
    if speed:
        s = speed["seconds"]
        lines += [
            "",
            f"| speed: {speed['arch']}, {speed['layers']} conv layers, {speed['images']:,} images, batch {speed['batch']} | seconds | images/s | vs streaming |",
            "|---|---:|---:|---:|",
        ]
        for name in ("streaming", "stored", "forward only", "two forwards"):
            lines.append(f"| {name} | {s[name]:.2f} | {speed['images'] / s[name]:.0f} | {s[name] / s['streaming']:.2f}x |")
        o = speed["overhead_seconds"]
        lines += [
            "",
            f"End to end, stored / streaming = {speed['speedup']:.2f}. Above their own forward passes, streaming adds "
            f"{o['streaming']:.2f} s ([x; x_adv] at once) and stored adds {o['stored']:.2f} s (x, then x_adv). "
            f"The two measurements agree to {speed['max_relative_difference']:.1e} relative.",
            "",
        ]
        lines += [f"Per-round ratio {key}: {c['verdict']}." for key, c in speed["comparisons"].items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10000], help="MNIST-sized data set sizes for the memory benchmark")
    parser.add_argument("--stored-samples", type=int, nargs="*", default=[1000, 2000], help="sizes for the stored-activation contrast (it grows fast)")
    parser.add_argument("--mnist-arch", default="small-cnn")
    parser.add_argument("--mnist-batch", type=int, default=250)
    parser.add_argument("--cifar-arch", default="resnet18")
    parser.add_argument("--images", type=int, default=4096, help="synthetic 32x32 images for the speed benchmark (0 skips it)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the speed benchmark runs (the memory benchmark, of host memory, runs on cpu only)")
    parser.add_argument("--repeats", type=int, default=3, help="speed rounds at least")
    parser.add_argument("--max-repeats", type=int, default=10, help="speed rounds at most, while the ratios stay within noise")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="streaming", choices=["streaming", "stored"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.memory_child is not None:
        memory_child(args)
        return

    env = environment(args.device)  # before the run, so files written meanwhile cannot change the recorded commit
    memory = run_memory(args) if args.device == "cpu" else []  # resident memory is the host's
    speed = run_speed(args) if args.images > 0 else None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"measure_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "memory": memory, "speed": speed}, f, indent=2)
    table = markdown(memory, speed)
    with open(stem + ".md", "w") as f:
        f.write(f"{header(env)}\n\nfloat32\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
