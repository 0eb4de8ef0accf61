#!/usr/bin/env python
"""Figures 1 and 4 of the paper from training runs: mmAP vs wall-clock hours and vs epoch.

Reads each output directory's ``metrics.json`` and ``config.yaml``:

* mmAP: ``bbox/AP`` (COCO AP@[.5:.95], in %), written by every evaluation;
* hours: training time, the per-iteration ``time`` detectron2's IterationTimer logs (a median
  over the iterations since the previous record) integrated over iterations; evaluation and
  other hooks are excluded;
* epochs: (iteration + 1) / ``SOLVER.MEGDET.ITERS_PER_EPOCH`` (or ``--iters-per-epoch``); LR
  decays (Figure 4's dashed lines) at ``SOLVER.STEPS`` / iterations per epoch;
* when a run measured it (``MEGDET.NOISE_SCALE``): a third panel, the gradient noise scale
  ``noise_scale/b_simple`` vs epoch, each run's mini-batch ``SOLVER.IMS_PER_BATCH`` dotted.

    python tools/plot_curves.py output/b16_long output/b256_long --out docs/curves.png
"""

import argparse
import math
import os

import matplotlib

from megdet_d2.utils import read_config, read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

__all__ = ["extract_series", "plot_curves"]


def extract_series(run_dir, fallback_ipe=None, label=None):
    """The curves of one run.

    Returns:
        dict with ``label``, ``iterations``, ``ap`` (bbox/AP at each evaluation), ``hours``
        (training hours at each evaluation), ``epochs`` (epochs at each evaluation) and
        ``decay_epochs`` (epochs of the LR decays), ``batch`` (``SOLVER.IMS_PER_BATCH``) and
        ``b_simple_epochs`` / ``b_simple`` (the logged noise scale; empty if not measured).
    """
    records, config = read_metrics(run_dir), read_config(run_dir)
    ipe = config.get("SOLVER", {}).get("MEGDET", {}).get("ITERS_PER_EPOCH", 0) or fallback_ipe
    if not ipe:
        raise ValueError(
            f"{run_dir}: config.yaml has no SOLVER.MEGDET.ITERS_PER_EPOCH; pass --iters-per-epoch"
        )
    seconds, last_iter, elapsed = 0.0, -1, {}
    for r in records:
        if "time" in r:  # seconds per iteration, covering the iterations since the last log
            seconds += r["time"] * (r["iteration"] - last_iter)
            last_iter = r["iteration"]
        elapsed[r["iteration"]] = seconds
    evals = [r for r in records if "bbox/AP" in r]
    steps = config.get("SOLVER", {}).get("STEPS", [])
    noise = [r for r in records if "noise_scale/b_simple" in r]
    return {
        "label": label or os.path.basename(os.path.normpath(run_dir)),
        "iterations": [r["iteration"] for r in evals],
        "ap": [
            math.nan if r["bbox/AP"] is None else r["bbox/AP"] for r in evals
        ],  # null: no detections
        "hours": [elapsed[r["iteration"]] / 3600 for r in evals],
        "epochs": [(r["iteration"] + 1) / ipe for r in evals],
        "decay_epochs": [s / ipe for s in steps],
        "batch": config.get("SOLVER", {}).get("IMS_PER_BATCH"),
        "b_simple_epochs": [(r["iteration"] + 1) / ipe for r in noise],
        "b_simple": [
            math.nan if r["noise_scale/b_simple"] is None else r["noise_scale/b_simple"]
            for r in noise
        ],  # null: the |G|² estimate was not positive
    }


def plot_curves(series, out_path, title=None):
    """Draw Figure 1 (mmAP vs hours) and Figure 4 (mmAP vs epoch, dashed LR decays) side by
    side into ``out_path``, and B_simple vs epoch beside them if a run has it; returns the
    (hours axes, epochs axes) or (hours axes, epochs axes, B_simple axes)."""
    noise = any(s.get("b_simple") for s in series)
    fig, axes = plt.subplots(1, 3 if noise else 2, figsize=(18 if noise else 12, 4.5))
    ax_h, ax_e = axes[:2]
    for s in series:
        (line,) = ax_h.plot(s["hours"], s["ap"], marker="o", label=s["label"])
        ax_e.plot(s["epochs"], s["ap"], marker="o", color=line.get_color(), label=s["label"])
        for d in s["decay_epochs"]:
            ax_e.axvline(d, linestyle="--", color=line.get_color(), alpha=0.6)
    ax_h.set(xlabel="training time (hours)", ylabel="mmAP (bbox AP, %)",
             title="mmAP vs wall-clock time (Fig. 1)")  # fmt: skip
    ax_e.set(xlabel="epoch", ylabel="mmAP (bbox AP, %)",
             title="mmAP vs epoch, dashed: LR decay (Fig. 4)")  # fmt: skip
    if noise:
        _plot_b_simple(axes[2], series, [line.get_color() for line in ax_h.get_lines()])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return tuple(axes)


def _plot_b_simple(ax, series, colors):
    """B_simple (EMA) vs epoch, log scale; each run's mini-batch B as a dotted line of its colour:
    a curve above it means larger batches would still train nearly linearly faster."""
    for s, color in zip(series, colors):
        if s.get("b_simple"):
            ax.plot(s["b_simple_epochs"], s["b_simple"], marker=".", color=color, label=s["label"])
            if s.get("batch"):
                ax.axhline(s["batch"], linestyle=":", color=color, alpha=0.8)
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="B_simple (images)",
           title="gradient noise scale, dotted: mini-batch")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs", nargs="+", help="output directories (metrics.json, config.yaml)"
    )
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: dir name)")
    parser.add_argument("--iters-per-epoch", type=int, default=None,
                        help="when config.yaml has no SOLVER.MEGDET.ITERS_PER_EPOCH")  # fmt: skip
    parser.add_argument("--out", default="curves.png", help="PNG path")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    labels = args.labels or [None] * len(args.run_dirs)
    if len(labels) != len(args.run_dirs):
        parser.error(f"{len(labels)} --labels for {len(args.run_dirs)} runs")
    try:
        series = [
            extract_series(d, args.iters_per_epoch, lab) for d, lab in zip(args.run_dirs, labels)
        ]
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for s in series:
        if not s["ap"] and not s["b_simple"]:  # a short noise-scale run needs no evaluation
            parser.error(f"{s['label']}: metrics.json has no bbox/AP (no evaluation ran)")
    axes = plot_curves(series, args.out, args.title)
    print(f"wrote {args.out}")
    return axes


if __name__ == "__main__":
    main()
