"""A full SNS training step against a PGD-AT step: same model, batch and PGD-10 attack.

A step is the attack, the loss, backward and the optimizer update, on synthetic data in train
mode. Variants, timed interleaved (one step of each in turn, median over the rounds) so that
machine noise hits all of them alike:
  * pgd_at: cross-entropy on the PGD batch;
  * trades: TRADES (beta 1), whose KL attack and two forwards are the same passes as an SNS step;
  * two_graphs: pgd_at plus a benign forward that joins the loss with weight 0: the extra graph
    SNS needs (forward and backward), without its ops, i.e. the floor of any SNS step;
  * sns: the package defaults (benign and adversarial forwards captured, top-k per layer, fused
    stabilize term and its gradient);
  * sns_detached: the same with the benign side detached (its forward runs without a graph).
The regularizer's share of a step is (sns - two_graphs) / sns: everything SNS adds to the passes,
but a difference of two noisy times. On the fused backend, one more SNS step runs under
torch.profiler, and the host time inside the neurosens ops (outermost calls: forward, backward,
selection) over that step's time is reported as "ops share": small, but measured directly.
Each backend (the fused extension, then the pure-PyTorch fallback in a subprocess with
NEUROSENS_NO_EXT=1) is one run. Writes JSON and a markdown table, with the git commit, machine,
torch version and command, to benchmarks/results/.

    python benchmarks/bench_sns_step.py
    python benchmarks/bench_sns_step.py --keep-freed-memory   # as the neurosens command runs
    python benchmarks/bench_sns_step.py --device cuda --resnet-batch 256 --amp
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench_ops import check_device, environment, header

MODELS = {
    "small-cnn (MNIST)": {"spec": {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 28}, "eps": 0.3},
    "resnet18 (CIFAR)": {"spec": {"name": "resnet18", "num_classes": 10, "in_channels": 3, "input_size": 32}, "eps": 8 / 255},
}


def two_graphs_loss(model, x, y, attack):
    x_adv = attack(x, y)
    logits, logits_adv = model(x), model(x_adv)
    return torch.nn.functional.cross_entropy(logits_adv, y) + 0.0 * logits.sum(), {}


def variants(model, attack_steps, eps):
    from neurosens.attacks import PGD
    from neurosens.methods import SNSLoss, pgd_at_loss, trades_loss

    attack = PGD(model, eps, steps=attack_steps)
    return attack, {
        "pgd_at": pgd_at_loss,
        "trades": trades_loss(1.0),
        "two_graphs": two_graphs_loss,
        "sns": SNSLoss(model),
        "sns_detached": SNSLoss(model, detach_benign=True),
    }


def ops_share(step):
    """Host time inside the outermost neurosens ops over the time of one profiled call of step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start

    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("neurosens::"):
                return True
            parent = parent.cpu_parent
        return False

    inside = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("neurosens::") and not nested(e))
    return inside * 1e-6 / total


def time_steps(name, batch, args, device, fused):
    from neurosens.models import build_model

    torch.manual_seed(0)
    info = MODELS[name]
    model = build_model(**info["spec"]).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = info["spec"]
    x = torch.rand(batch, spec["in_channels"], spec["input_size"], spec["input_size"], device=device)
    y = torch.randint(0, spec["num_classes"], (batch,), device=device)
    attack, losses = variants(model, args.pgd_steps, info["eps"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(loss_fn):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, _ = loss_fn(model, x, y, attack)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for loss_fn in losses.values():
        for _ in range(args.warmup):
            step(loss_fn)
    times = {v: [] for v in losses}
    for _ in range(args.rounds):
        for v, loss_fn in losses.items():
            sync()
            start = time.perf_counter()
            step(loss_fn)
            sync()
            times[v].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    share = ops_share(lambda: step(losses["sns"])) if fused and device.type == "cpu" else None
    return {"ops_share": share,
            "model": name, "batch": batch, "ms": {v: 1e3 * t for v, t in medians.items()},
            "sns_over_pgd_at": medians["sns"] / medians["pgd_at"],
            "two_graphs_over_pgd_at": medians["two_graphs"] / medians["pgd_at"],
            "sns_detached_over_pgd_at": medians["sns_detached"] / medians["pgd_at"],
            "sns_over_trades": medians["sns"] / medians["trades"],
            # what the regularizer (capture, selection, stabilize forward + backward) adds to the passes
            "regularizer_share": (medians["sns"] - medians["two_graphs"]) / medians["sns"]}


def fraction(share):
    """A share as a percentage; a dash where none was measured (the reference ops are not neurosens
    ops, and on a GPU host time is not the ops' cost)."""
    return "-" if share is None else f"{100 * share:.2f}%"


def run_backend(args):
    """All models on the backend this process has; one JSON line on stdout."""
    from neurosens.extension import info

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from neurosens.cpu_memory import keep_freed_memory

        keep_freed_memory()
    device = torch.device(args.device)
    fused = info()["extension"] == "built"
    rows = [time_steps(name, args.cnn_batch if "cnn" in name else args.resnet_batch, args, device, fused) for name in MODELS]
    print(json.dumps({"backend": "fused" if fused else "reference", "rows": rows}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--cnn-batch", type=int, default=128)
    parser.add_argument("--resnet-batch", type=int, default=32, help="(default: 32 on a CPU; use 256 on a GPU)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc malloc to reuse freed blocks (neurosens.cpu_memory), as the CLI does")
    parser.add_argument("--backend-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.backend_only:
        return run_backend(args)

    child = [sys.executable, os.path.abspath(__file__), "--backend-only"] + sys.argv[1:]
    results = []
    for backend, flag in (("fused", "0"), ("reference", "1")):
        done = subprocess.run(child, env={**os.environ, "NEUROSENS_NO_EXT": flag}, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {backend} run failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        for r in result["rows"]:
            print(f"{result['backend']:9s} {r['model']:18s} batch {r['batch']:4d}  "
                  + "  ".join(f"{v} {t:8.1f} ms" for v, t in r["ms"].items())
                  + f"  sns/trades {r['sns_over_trades']:.3f}  regularizer share {r['regularizer_share']:.3f}"
                  + f"  ops share {fraction(r['ops_share'])}"
                  + f"  sns/pgd_at {r['sns_over_pgd_at']:.3f}  two_graphs/pgd_at {r['two_graphs_over_pgd_at']:.3f}  detached/pgd_at {r['sns_detached_over_pgd_at']:.3f}", flush=True)

    env = environment(args.device) | {"threads": args.threads or torch.get_num_threads(), "pgd_steps": args.pgd_steps,
                                      "amp": args.amp, "keep_freed_memory": args.keep_freed_memory}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"sns_step_{torch.device(args.device).type}" + ("_kept" if args.keep_freed_memory else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    lines = [header(env), "", f"PGD-{args.pgd_steps}" + (", bf16 autocast" if args.amp else "")
             + (", freed memory kept" if args.keep_freed_memory else "") + f"; median of {args.rounds} interleaved rounds", "",
             "| backend | model | batch | PGD-AT ms | TRADES ms | two graphs ms | SNS ms | SNS detached ms | two graphs / PGD-AT "
             "| SNS / PGD-AT | detached / PGD-AT | SNS / TRADES | regularizer share of SNS | ops share (profiled) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        for r in result["rows"]:
            ms = r["ms"]
            lines.append(f"| {result['backend']} | {r['model']} | {r['batch']} | {ms['pgd_at']:.1f} | {ms['trades']:.1f} "
                         f"| {ms['two_graphs']:.1f} | {ms['sns']:.1f} | {ms['sns_detached']:.1f} | {r['two_graphs_over_pgd_at']:.3f} "
                         f"| {r['sns_over_pgd_at']:.3f} | {r['sns_detached_over_pgd_at']:.3f} | {r['sns_over_trades']:.3f} "
                         f"| {r['regularizer_share']:.3f} | {fraction(r['ops_share'])} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
