"""Sub-linear memory (MEGDET.SUBLINEAR_MEMORY): memory and time per training iteration.

Builds detectron2's GeneralizedRCNN from ``configs/Base-MegDet-RCNN-FPN.yaml`` (R-50 FPN, CGBN in
backbone and FPN, res2 and stem frozen as configured; ``MODEL.WEIGHTS ""``) in each of 2 CPU
processes (gloo, one thread each, CGBN over both), once plain and once with
``apply_sublinear_memory``, same weights, both wrapped in DDP. Every iteration runs forward +
backward + SGD step on the same synthetic batch (``--images`` images of ``--size`` px per
process, a few boxes each) for both variants in turn, so load bursts on a shared machine hit them
alike. Memory, above its value just before the iteration (gradients freed): "activations" at
the end of the forward pass, and the iteration's peak (activations + gradients + temporaries),
from a thread sampling the process RSS every ms (glibc is told to return large blocks to the
OS, ``MALLOC_MMAP_THRESHOLD_``, so RSS follows live memory).
With a GPU, the same is measured in one process with ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_sublinear.py --iters 3 --warmup 1
"""

import argparse
import copy
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist
from detectron2.config import get_cfg
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from megdet_d2 import add_megdet_config
from megdet_d2.engine import create_ddp_model, setup_cgbn_groups
from megdet_d2.modeling import apply_sublinear_memory

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "Base-MegDet-RCNN-FPN.yaml")
MODES = ("plain", "sublinear")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def build_cfg(device):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    return cfg


def make_batch(images, size, seed):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        xy = torch.randint(0, size // 2, (5, 2), generator=g).float()
        wh = torch.randint(32, size // 2, (5, 2), generator=g).float()
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 80, (5,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Background sampler of this process's RSS; ``peak`` since the last ``reset``."""

    def __init__(self, interval=0.001):
        self.peak, self._interval, self._stop = 0, interval, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(self._interval)

    def reset(self):
        self.peak = _rss()

    def stop(self):
        self._stop = True
        self._thread.join()


def build_variants(cfg, distributed):
    torch.manual_seed(0)
    plain = build_model(cfg)
    sub = copy.deepcopy(plain)
    checkpointed = apply_sublinear_memory(sub)
    variants = {}
    for mode, model in zip(MODES, (plain, sub)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if distributed:
            model = create_ddp_model(model, broadcast_buffers=False)
        variants[mode] = (model, optimizer)
    return variants, checkpointed


def step(model, optimizer, batch, memory=lambda: 0):
    """One training iteration; returns ``memory()`` taken when the forward pass is done.

    Gradients are freed before the forward (``set_to_none``), so memory measured from just
    before the call counts activations up to the forward's end, then gradients too.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = sum(model(batch).values())
    after_forward = memory()
    loss.backward()
    optimizer.step()
    return after_forward


def cpu_worker(args):
    torch.set_num_threads(1)
    cfg = build_cfg("cpu")
    setup_cgbn_groups(cfg)
    variants, checkpointed = build_variants(cfg, distributed=True)
    batch = make_batch(args.images, args.size, seed=comm.get_rank())
    sampler = PeakRSS()
    samples = {m: [] for m in MODES}  # (seconds, kept by forward, iteration peak) per iteration
    with EventStorage(0):
        for i in range(args.warmup + args.iters):
            for mode, (model, optimizer) in variants.items():
                optimizer.zero_grad(set_to_none=True)
                dist.barrier()
                sampler.reset()
                before = _rss()
                start = time.perf_counter()
                after_forward = step(model, optimizer, batch, memory=_rss)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    samples[mode].append((elapsed, after_forward - before, sampler.peak - before))
    sampler.stop()
    # a synchronous job runs at the pace of its slowest rank, and needs its largest memory
    stats = torch.tensor(
        [[statistics.median(col) for col in zip(*samples[m])] for m in MODES], dtype=torch.float64
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if comm.is_main_process():
        report(
            stats.tolist(),
            f"CPU, 2 processes x {args.images} images of {args.size} px, CGBN over both, "
            f"{len(checkpointed)} modules checkpointed; median of {args.iters} iterations, "
            "slowest rank / largest memory",
            "RSS",
        )


def cuda_run(args):
    cfg = build_cfg("cuda")
    variants, _ = build_variants(cfg, distributed=False)
    batch = make_batch(args.images, args.size, seed=0)
    rows = []
    with EventStorage(0):
        for mode, (model, optimizer) in variants.items():
            samples = []
            for i in range(args.warmup + args.iters):
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                after_forward = step(model, optimizer, batch, memory=torch.cuda.memory_allocated)
                torch.cuda.synchronize()
                if i >= args.warmup:
                    peak = torch.cuda.max_memory_allocated()
                    samples.append(
                        (time.perf_counter() - start, after_forward - before, peak - before)
                    )
            rows.append([statistics.median(col) for col in zip(*samples)])
    report(
        rows,
        f"CUDA ({torch.cuda.get_device_name()}), 1 process x {args.images} images of "
        f"{args.size} px (CGBN = BN); median of {args.iters} iterations",
        "allocated",
    )


def report(rows, title, memory):
    """Markdown table; memory columns are ``memory`` above its value before the iteration."""
    (t0, a0, p0), (t1, a1, p1) = rows
    mib = 2**20
    print(f"\n{title}\n")
    print(f"| variant | s / iteration | activations kept by forward ({memory} after forward "
          f"- before), MiB | iteration peak ({memory}), MiB |\n|---|---|---|---|")  # fmt: skip
    print(f"| plain | {t0:.2f} | {a0 / mib:.0f} | {p0 / mib:.0f} |")
    print(f"| sublinear memory | {t1:.2f} | {a1 / mib:.0f} | {p1 / mib:.0f} |")
    print(f"| ratio sublinear / plain | {t1 / t0:.2f}x | {a1 / a0:.2f}x | {p1 / p0:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=2, help="images per process")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="which measurements"
    )
    args = parser.parse_args()
    if args.device in ("all", "cpu"):
        # Large blocks straight from / back to the OS (no dynamic threshold), so RSS tracks
        # live memory; read by the spawned processes at start-up.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        launch(cpu_worker, 2, dist_url="auto", args=(args,))
    if args.device == "cpu":
        return
    if torch.cuda.is_available():
        cuda_run(args)
    else:
        print("\nNo GPU: CUDA max_memory_allocated measurement skipped.")


if __name__ == "__main__":
    main()
