#!/usr/bin/env python
"""
Plot the LR of every iteration under MegDet's "normal" and "long" presets (paper §4) for a few
mini-batch sizes, by stepping the real scheduler (``SOLVER.LR_SCHEDULER_NAME:
"LinearScalingWarmupLR"``) the way detectron2's trainer does.

    python tools/plot_lr.py                       # -> docs/lr_presets.png
    python tools/plot_lr.py --batch-sizes 16 64 256 --output /tmp/lr.png
"""

import argparse
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from detectron2.config import get_cfg

from megdet_d2.config import add_megdet_config
from megdet_d2.solver import apply_schedule_preset, build_lr_scheduler


def lr_curve(schedule, ims_per_batch, epoch_size, base_lr, warmup_iters):
    """(epoch of each iteration, LR of each iteration, derived numbers) for one setting."""
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "LinearScalingWarmupLR"
    cfg.SOLVER.BASE_LR = base_lr
    cfg.SOLVER.IMS_PER_BATCH = ims_per_batch
    cfg.SOLVER.WARMUP_ITERS = warmup_iters
    cfg.SOLVER.MEGDET.SCHEDULE = schedule
    cfg.SOLVER.MEGDET.EPOCH_SIZE = epoch_size
    derived = apply_schedule_preset(cfg)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = np.empty(cfg.SOLVER.MAX_ITER)
    for it in range(cfg.SOLVER.MAX_ITER):
        lrs[it] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return np.arange(len(lrs)) / derived["iters_per_epoch"], lrs, derived


def main(args):
    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, schedule in zip(axes[:2], ["normal", "long"]):
        for color, batch in zip(colors, args.batch_sizes):
            epochs, lrs, derived = lr_curve(
                schedule, batch, args.epoch_size, args.base_lr, args.warmup_iters
            )
            label = (
                f"batch {batch}: {derived['iters_per_epoch']} it/epoch, "
                f"MAX_ITER {derived['max_iter']}, STEPS {derived['steps']}"
            )
            ax.plot(epochs, lrs, color=color, label=label)
            if schedule == "normal":
                zoom = epochs * derived["iters_per_epoch"] <= 2 * args.warmup_iters
                axes[2].plot(
                    epochs[zoom] * derived["iters_per_epoch"], lrs[zoom], color=color, label=label
                )
        for epoch in derived["steps"]:
            ax.axvline(epoch / derived["iters_per_epoch"], color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate (log scale)")
        gammas = ", x".join(f"{g:g}" for g in derived["step_gammas"])
        end = derived["max_iter"] // derived["iters_per_epoch"]
        ax.set_title(f'"{schedule}": x{gammas} at the dashed lines, end at epoch {end}')
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(True, which="major", alpha=0.3)

    axes[2].axvline(args.warmup_iters, color="gray", ls="--", lw=0.8)
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("learning rate")
    axes[2].set_title(f"warmup, first {2 * args.warmup_iters} iterations")
    axes[2].grid(True, alpha=0.3)
    fig.suptitle(
        f"MegDet LR (LinearScalingWarmupLR), COCO-sized epoch (EPOCH_SIZE {args.epoch_size}): "
        f"BASE_LR {args.base_lr} at reference batch 16, peak = BASE_LR x batch / 16\n"
        f"WARMUP_ITERS {args.warmup_iters}: linear from BASE_LR to the peak "
        "(batch <= 16: from WARMUP_FACTOR x peak, as in detectron2)"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--epoch-size", type=int, default=117266, help="images per epoch")
    parser.add_argument("--base-lr", type=float, default=0.02, help="LR at batch 16")
    parser.add_argument("--warmup-iters", type=int, default=500)
    parser.add_argument("--output", default="docs/lr_presets.png")
    parser.add_argument("--dpi", type=int, default=110)
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
