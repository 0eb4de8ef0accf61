#!/usr/bin/env python
"""The paper's central claim, small: a larger mini-batch reaches the small batch's accuracy in
the same number of epochs (fewer iterations) with CGBN + linear scaling + warmup.

Every run trains the quickstart detector (``configs/quickstart/shapes_R18_FPN.yaml``: R-18 FPN
from scratch, CGBN over both processes) in 2 CPU processes for the same number of epochs of the
built-in data, with the "normal" preset stretched to that length (``SOLVER.MEGDET.EPOCHS``:
x0.1 at 8/11 and 10/11 of training), evaluating every epoch. The reference rate r = 0.02 is set
at batch 4 (``REFERENCE_BATCH_SIZE 4``), the "16-base" analogue; the warmup lasts one epoch.

* ``b4``: batch 4 (2 x 2) at r;
* ``b16`` / ``b32``: batch 16 (2 x 8) / 32 (2 x 16), linear scaling (k·r) + warmup from r;
* ``b32_nowarmup``: batch 32 at k·r from iteration 0;
* ``b32_noscale``: batch 32 at r (the LR not scaled);
* ``b32_bn``: batch 32 with per-process BN (BN size 16 instead of 32);
* ``b4_seed2`` / ``b32_seed2``: second seeds, to measure run-to-run noise.

Prints a Table-3-style table (batch, BN size, LR policy, iterations, training / wall-clock
time, final mmAP / mmAR, AP at each epoch), writes it to ``OUT_DIR/table.md``, and draws
Figures 1 and 4 (``OUT_DIR/curves.png``) with ``tools/plot_curves.py``. About an hour on a
2-core machine with the defaults (256 training images, 8 epochs: 2048 images per run).

    python experiments/batch_scaling.py --out-dir output/batch_scaling
"""

import argparse
import math
import os
import subprocess
import sys

from megdet_d2.utils import read_metrics, run_training_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
BASE_LR, REFERENCE_BATCH = 0.02, 4
CGBN = ["MODEL.RESNETS.NORM", "CGBN", "MODEL.FPN.NORM", "CGBN"]
BN = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN"]

# name -> (batch, BN size, LR policy, overrides); "{warmup}" = one epoch of iterations
VARIANTS = {
    "b4": (4, 4, "r", []),
    "b16": (16, 16, "k·r, warmup", []),
    "b32": (32, 32, "k·r, warmup", []),
    "b32_nowarmup": (32, 32, "k·r, no warmup", ["SOLVER.WARMUP_ITERS", "0"]),
    "b32_noscale": (32, 32, "r (not scaled)", ["SOLVER.MEGDET.REFERENCE_BATCH_SIZE", "32"]),
    "b32_bn": (32, 16, "k·r, warmup; per-process BN", BN),
    "b4_seed2": (4, 4, "r; seed 2", ["SEED", "7"]),
    "b32_seed2": (32, 32, "k·r, warmup; seed 2", ["SEED", "7"]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run")
    parser.add_argument("--num-train", type=int, default=256, help="training images (an epoch)")
    parser.add_argument("--num-val", type=int, default=64, help="validation images")
    parser.add_argument("--out-dir", default=os.path.join("output", "batch_scaling"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.num_train < max(VARIANTS[v][0] for v in args.variants):
        parser.error("need --epochs >= 2 and --num-train >= the largest batch")
    return args


def train_command(args, variant):
    """The train_net.py command line of one run."""
    batch, _, _, overrides = VARIANTS[variant]
    warmup = math.ceil(args.num_train / batch)  # one epoch
    return [
        sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
        "--dist-url", "auto", "--config-file", CONFIG,
        "MEGDET.QUICKSTART.ROOT", os.path.join(args.out_dir, "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", str(args.num_train),
        "MEGDET.QUICKSTART.NUM_VAL", str(args.num_val),
        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", str(BASE_LR),
        "SOLVER.MEGDET.REFERENCE_BATCH_SIZE", str(REFERENCE_BATCH),
        "SOLVER.MEGDET.SCHEDULE", "normal", "SOLVER.MEGDET.EPOCHS", str(args.epochs),
        "SOLVER.MEGDET.EVAL_PERIOD_EPOCHS", "1", "SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.WARMUP_ITERS", str(warmup),
        "MEGDET.LOG_PERIOD", "1", *CGBN, *overrides,
        "OUTPUT_DIR", os.path.join(args.out_dir, variant),
    ]  # fmt: skip


def summarize(run_dir):
    """AP per evaluation, final mmAP / mmAR, iterations and training hours of one run."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return None
    records = read_metrics(run_dir)
    evals = [r for r in records if "bbox/AP" in r]
    seconds, last = 0.0, -1
    for r in records:
        if "time" in r:
            seconds += r["time"] * (r["iteration"] - last)
            last = r["iteration"]
    return {
        "ap": [r["bbox/AP"] for r in evals],
        "ar": evals[-1].get("bbox/AR") if evals else None,
        "iterations": max((r["iteration"] for r in records if "lr" in r), default=-1) + 1,
        "train_s": seconds,
    }


def _fmt(x):
    return "—" if x is None or x != x else f"{x:.1f}"  # null / NaN (no detections): "—"


def table(args, results):
    """Markdown table of the runs."""
    header = [
        "| run | batch | BN size | LR policy | iterations | train time | wall-clock | final mmAP "
        "| final mmAR | AP after epoch "
        + " / ".join(str(e) for e in range(1, args.epochs + 1))
        + " | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for variant, (summary, wall, rc) in results.items():
        batch, bn, policy, _ = VARIANTS[variant]
        if summary is None:
            rows.append(f"| {variant} | {batch} | {bn} | {policy} | — | — | {wall:.0f} s | — | — "
                        f"| — | {rc} |")  # fmt: skip
            continue
        aps = " / ".join(_fmt(a) for a in summary["ap"])
        final = summary["ap"][-1] if len(summary["ap"]) == args.epochs else None
        rows.append(
            f"| {variant} | {batch} | {bn} | {policy} | {summary['iterations']} | "
            f"{summary['train_s']:.0f} s | {wall:.0f} s | {_fmt(final)} | "
            f"{_fmt(summary['ar']) if final is not None else '—'} | {aps} | {rc} |"
        )
    return "\n".join(header + rows)


def main(argv=None):
    args = parse_args(argv)
    commands = {v: train_command(args, v) for v in args.variants}
    runs = run_training_commands(commands, args.out_dir, REPO, dry_run=args.dry_run)
    if args.dry_run:
        return commands
    results = {
        v: (summarize(os.path.join(args.out_dir, v)), wall, rc) for v, (rc, wall) in runs.items()
    }
    text = table(args, results)
    print("\n" + text)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    done = [v for v, (s, _, _) in results.items() if s and s["ap"]]
    if done:
        png = os.path.join(args.out_dir, "curves.png")
        title = f"batch scaling, quickstart R-18 FPN, {args.epochs} epochs of {args.num_train}"
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_curves.py"),
                        *[os.path.join(args.out_dir, v) for v in done], "--out", png,
                        "--title", title], cwd=REPO)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
