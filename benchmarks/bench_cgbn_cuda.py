"""CGBN on a GPU, per layer: CGBN's synchronised path vs torch's SyncBatchNorm vs BatchNorm2d.

One process, one GPU, an NCCL group of size 1. Both synchronised autograd Functions are called
directly on that group (a CGBN or SyncBatchNorm layer would short-cut a group of one to plain
BN), so each does its full work: statistics kernel, one NCCL all-gather, merge, normalisation;
backward reduce, one NCCL all-reduce, elementwise backward. Shapes are those of R50-FPN's norm
layers at 2 images per GPU of 800 x 1216 px. For each shape and precision (fp32; AMP = fp16
input from autocast'ed convolutions into an fp32 layer) the three variants run fwd + bwd in
turn, ``--iters`` iterations per timing, CUDA events around the whole loop (launch overhead and
host syncs included, as in training), median of ``--repeats`` timings. Host syncs per forward /
backward come from torch's sync debug mode.

    python benchmarks/bench_cgbn_cuda.py [--iters 50 --repeats 7] [--out table.md]
"""

import argparse
import os
import statistics
import sys
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


def _time(fn, layer, x, dy, group, iters, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            _step(fn, layer, x, dy, group)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _syncs(fn, layer, x, dy, group):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
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
        f"fwd + bwd ms per layer call, median of {args.repeats} x {args.iters} iterations",
        "",
        "| layer (2 images, 800 x 1216) | C x H x W | precision | BN | SyncBN | CGBN | "
        "CGBN / SyncBN | host syncs fwd/bwd: SyncBN, CGBN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, c, h, w in SHAPES:
        for precision, dtype in (("fp32", torch.float32), ("AMP fp16", torch.float16)):
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(BATCH, c, h, w, device="cuda", generator=gen).to(dtype)
            x.requires_grad_()
            dy = torch.randn(BATCH, c, h, w, device="cuda", generator=gen).to(dtype)
            ms, syncs = {}, {}
            for variant, fn in VARIANTS.items():
                layer = nn.BatchNorm2d(c).cuda()  # fp32 parameters, as under AMP
                for _ in range(3):  # warm-up (cudnn autotuning, NCCL)
                    _step(fn, layer, x, dy, group)
                syncs[variant] = _syncs(fn, layer, x, dy, group)
                ms[variant] = _time(fn, layer, x, dy, group, args.iters, args.repeats)
            ratio = ms["CGBN"] / ms["SyncBN"]
            worst = max(worst, ratio)
            lines.append(
                f"| {name} | {c} x {h} x {w} | {precision} | {ms['BN']:.3f} | "
                f"{ms['SyncBN']:.3f} | {ms['CGBN']:.3f} | {ratio:.2f}x | "
                f"{syncs['SyncBN'][0]}/{syncs['SyncBN'][1]}, {syncs['CGBN'][0]}/"
                f"{syncs['CGBN'][1]} |"
            )
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
