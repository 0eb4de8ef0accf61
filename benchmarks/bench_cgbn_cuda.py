"""CGBN on a GPU, per layer: CGBN's synchronised path vs torch's SyncBatchNorm vs BatchNorm2d.

One process, one GPU, an NCCL group of size 1. Both synchronised autograd Functions are called
directly on that group (a CGBN or SyncBatchNorm layer would short-cut a group of one to plain
BN), so each does its full work: statistics kernel, one NCCL all-gather, merge, normalisation;
backward reduce, one NCCL all-reduce, elementwise backward. Shapes are those of R50-FPN's norm
layers at 2 images per GPU of 800 x 1216 px. For each shape and precision (fp32; AMP = fp16
input from autocast'ed convolutions into an fp32 layer) the three variants are timed
interleaved: each of ``--repeats`` rounds times every variant once (``--iters`` fwd + bwd
calls, CUDA events around the whole loop: launch overhead and host syncs included, as in
training), in an order that rotates from round to round, so that clock or load drift hits all
variants alike. A variant's time is its median over the rounds; CGBN / SyncBN is the median of
the per-round ratios, with their range, which shows how much a single ratio can be trusted.
Host syncs per forward / backward come from torch's sync debug mode.

    python benchmarks/bench_cgbn_cuda.py [--iters 50 --repeats 11] [--out table.md]
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

from megdet_d2.layers.cgbn_function import CGBNFunction

# (name, channels, height, width) at batch 2, 800 x 1216 input
SHAPES = [
    ("stem", 64, 400, 608),
    ("res2 3x3", 64, 200, 304),
    ("res2 out / P2", 256, 200, 304),
    ("res3 3x3", 128, 100, 152),
    ("res3 out", 512, 100, 152),
    ("res4 3x3 / P4", 256, 50, 76),
    ("res4 out", 1024, 50, 76),
    ("res5 3x3", 512, 25, 38),
    ("res5 out", 2048, 25, 38),
    ("P6", 256, 13, 19),
]
BATCH = 2


def _cgbn(layer, x, group):
    return CGBNFunction.apply(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
        layer.num_batches_tracked, layer.eps, layer.momentum, group,
    )  # fmt: skip


def _syncbn(layer, x, group):
    layer.num_batches_tracked.add_(1)  # as nn.SyncBatchNorm.forward does
    return SyncBatchNormFunction.apply(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.eps,
        layer.momentum, group, 1,
    )  # fmt: skip


def _bn(layer, x, group):
    return layer(x)


VARIANTS = {"CGBN": _cgbn, "SyncBN": _syncbn, "BN": _bn}


def _step(fn, layer, x, dy, group):
    out = fn(layer, x, group)
    out.backward(dy)


def _elapsed_ms(run, device):
    """Wall time of ``run()``: CUDA events around it on a GPU (launch overhead and host syncs
    included, as in training); ``perf_counter`` elsewhere (the CPU dry run in CI)."""
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_interleaved(layers, x, dy, group, iters, repeats):
    """ms per call of every variant: ``repeats`` rounds, each timing every variant once, the
    order rotating by round."""
    names = list(VARIANTS)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, layer = VARIANTS[name], layers[name]

            def run():
                for _ in range(iters):
                    _step(fn, layer, x, dy, group)

            times[name].append(_elapsed_ms(run, x.device) / iters)
    return times


def _syncs(fn, layer, x, dy, group):
    """Host syncs of one forward and one backward (torch's sync debug mode; CUDA only)."""
    if x.device.type != "cuda":
        return None
    counts = []
    for phase in ("forward", "backward"):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            if phase == "forward":
                out = fn(layer, x, group)
            else:
                out.backward(dy)
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(r.message).lower() for r in records))
    return tuple(counts)


def measure(c, h, w, dtype, group, iters, repeats, device="cuda"):
    """One shape and input dtype: ms per call of each variant (median of the rounds), the
    per-round CGBN / SyncBN ratios, and each variant's host syncs (fwd, bwd) or None."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(BATCH, c, h, w, device=device, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(BATCH, c, h, w, device=device, generator=gen).to(dtype)
    layers, syncs = {}, {}
    for variant, fn in VARIANTS.items():
        layers[variant] = nn.BatchNorm2d(c).to(device)  # fp32 parameters, as under AMP
        for _ in range(3):  # warm-up (cudnn autotuning, NCCL)
            _step(fn, layers[variant], x, dy, group)
        syncs[variant] = _syncs(fn, layers[variant], x, dy, group)
    times = _time_interleaved(layers, x, dy, group, iters, repeats)
    return {
        "ms": {variant: statistics.median(t) for variant, t in times.items()},
        "ratios": [a / b for a, b in zip(times["CGBN"], times["SyncBN"])],
        "syncs": syncs,
    }


def table_row(name, c, h, w, precision, result):
    """The Markdown row of one ``measure`` result."""
    ms, ratios, syncs = result["ms"], result["ratios"], result["syncs"]

    def fmt(s):
        return "n/a" if s is None else f"{s[0]}/{s[1]}"

    return (
        f"| {name} | {c} x {h} x {w} | {precision} | {ms['BN']:.3f} | {ms['SyncBN']:.3f} | "
        f"{ms['CGBN']:.3f} | {statistics.median(ratios):.2f}x | "
        f"{min(ratios):.2f}-{max(ratios):.2f} | {fmt(syncs['SyncBN'])}, {fmt(syncs['CGBN'])} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No GPU: nothing to measure.")
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = dist.group.WORLD
    torch.backends.cudnn.benchmark = True
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL group of 1; "
        f"fwd + bwd ms per layer call (median of {args.repeats} interleaved rounds of "
        f"{args.iters} calls); CGBN / SyncBN: median of the per-round ratios, and their range",
        "",
        "| layer (2 images, 800 x 1216) | C x H x W | precision | BN | SyncBN | CGBN | "
        "CGBN / SyncBN | per-round range | host syncs fwd/bwd: SyncBN, CGBN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, c, h, w in SHAPES:
        for precision, dtype in (("fp32", torch.float32), ("AMP fp16", torch.float16)):
            result = measure(c, h, w, dtype, group, args.iters, args.repeats)
            worst = max(worst, statistics.median(result["ratios"]))
            lines.append(table_row(name, c, h, w, precision, result))
            print(lines[-1], flush=True)
    lines += ["", f"Largest CGBN / SyncBN ratio: {worst:.2f}x"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
