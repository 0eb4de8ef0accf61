#!/usr/bin/env python
"""A small reproduction of the paper's BN-size trend (Table 3) on the built-in shapes data.

Trains the quickstart detector (``configs/quickstart/shapes_R18_FPN.yaml``: R-18 FPN from
scratch, 2 processes x 2 images = batch 4, same LR policy and schedule for all) three times:

* ``frozenbn``: FrozenBN backbone, no FPN norm -- the "16-base" analogue. From scratch, FrozenBN
  keeps its initial statistics (mean 0, var 1, weight 1, bias 0): no normalisation at all, which
  is what "no BN" leaves of an untrained network (the paper's baseline keeps ImageNet's);
* ``bn``: per-process BatchNorm in backbone and FPN (BN size = 2 images per process);
* ``cgbn``: CGBN across both processes (BN size 4), the quickstart as written.

then prints each run's final box AP (and a Table-1-style sample ratio) and writes a
Figure-4-style PNG (mmAP vs epoch) with ``tools/plot_curves.py``. Not part of CI (~5 min a run
on 2 CPU cores).

    python experiments/bn_size_trend.py --out-dir output/bn_size_trend
"""

import argparse
import math
import os
import subprocess
import sys

from megdet_d2.utils import read_metrics, run_training_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
IMS_PER_BATCH, NUM_TRAIN = 4, 512  # the quickstart config's batch and data-set defaults

# variant -> (description, BN size, config overrides)
VARIANTS = {
    "frozenbn": ("FrozenBN, no FPN norm (no normalisation)", 0,
                 ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", ""]),
    "bn": ("per-process BN", 2, ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN"]),
    "cgbn": ("CGBN over 2 processes", 4, ["MODEL.RESNETS.NORM", "CGBN", "MODEL.FPN.NORM", "CGBN"]),
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=200, help="iterations per run")
    parser.add_argument("--eval-period", type=int, default=50, help="iterations between evals")
    parser.add_argument("--out-dir", default=os.path.join("output", "bn_size_trend"))
    parser.add_argument("--png", default=None, help="figure path (default: OUT_DIR/curves.png)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="more overrides for every run")
    args = parser.parse_args(argv)
    if args.iters < 4 or not 0 < args.eval_period <= args.iters:
        parser.error(f"need --iters >= 4 and 0 < --eval-period <= --iters ({args.iters})")
    return args


def train_command(args, variant):
    """The train_net.py command line of one run (LR decay at 3/4 of the run, as written)."""
    step = args.iters * 3 // 4
    return [
        sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
        "--dist-url", "auto", "--config-file", CONFIG,
        *VARIANTS[variant][2],
        "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", f"({step},)",
        "TEST.EVAL_PERIOD", str(args.eval_period),
        "OUTPUT_DIR", os.path.join(args.out_dir, variant),
        *args.opts,
    ]  # fmt: skip


def final_ap(run_dir):
    """Last bbox/AP in metrics.json; None if the run failed before evaluating."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return None
    aps = [r["bbox/AP"] for r in read_metrics(run_dir) if "bbox/AP" in r]
    return aps[-1] if aps else None


def main(argv=None):
    args = parse_args(argv)
    commands = {v: train_command(args, v) for v in args.variants}
    status = run_training_commands(commands, args.out_dir, REPO, dry_run=args.dry_run)
    if args.dry_run:
        return commands
    ipe = math.ceil(NUM_TRAIN / IMS_PER_BATCH)
    print("\n| run | BN size | final box AP | exit status |\n|---|---|---|---|")
    done = []
    for variant in args.variants:
        run_dir = os.path.join(args.out_dir, variant)
        ap = final_ap(run_dir)
        desc, bn, _ = VARIANTS[variant]
        rc = status[variant][0]
        print(f"| {variant}: {desc} | {bn} | {'failed' if ap is None else f'{ap:.1f}'} | {rc} |")
        if ap is not None:
            done.append(run_dir)
    if done:
        tools = os.path.join(REPO, "tools")
        png = args.png or os.path.join(args.out_dir, "curves.png")
        table = ("sample_stats_table.py", ["--epochs", "1", "2"])
        plot = ("plot_curves.py", ["--out", png, "--title", "quickstart R-18 FPN, batch 4"])
        for script, opts in (table, plot):  # run directories first: --epochs takes a list
            cmd = [sys.executable, os.path.join(tools, script), *done, *opts]
            subprocess.run(cmd + ["--iters-per-epoch", str(ipe)])
    return status


if __name__ == "__main__":
    main()
