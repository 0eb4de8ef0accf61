#!/usr/bin/env python
"""MegDet's central claim, the paper's way: from a pretrained backbone, BN trained by CGBN,
8x the mini-batch in the same epochs reaches the small batch's accuracy.

Every run fine-tunes ``configs/experiments/shapes_hard_R18_FPN.yaml`` (R-18 FPN on the harder
built-in data) from the backbone ``experiments/pretrain_backbone.py`` makes (once, cached), in
2 CPU processes, for the same number of epochs, the "normal" preset stretched to them
(``SOLVER.MEGDET.EPOCHS``: x0.1 at 8/11 and 10/11 of training), evaluating every epoch. The
rate r = 0.02 is set at the base batch B = 4 (2 x 2, ``REFERENCE_BATCH_SIZE 4``, the "16-base"
analogue); k = batch / 4; a warmup lasts one epoch (three in ``recipe_8x_warmup3``), from r to k·r.

* ``base``: batch B, FrozenBN backbone (pretrained statistics), no FPN norm, r (3 seeds);
* ``bn_base``: batch B, CGBN (BN size 4) in backbone and FPN, r (3 seeds);
* ``recipe_4x`` / ``recipe_8x``: 4B / 8B, CGBN, k·r with warmup (recipe_8x: 3 seeds);
* ``recipe_8x_nowarmup``: 8B, k·r from iteration 0;
* ``recipe_8x_warmup3``: 8B as ``recipe_8x`` with a warmup of 3 epochs (3 seeds): is the
  one-epoch warmup (25 updates) what fails at 8x?
* ``frozen_8x`` / ``frozen_8x_halflr``: 8B, FrozenBN, k·r / k·r/2 with warmup;
* ``perproc_bn_8x``: 8B, per-process BN (BN size 16) instead of CGBN;
* ``trend_bn2`` / ``trend_bn8`` (3 seeds each): the BN-size trend with ``bn_base`` (BN size 4)
  and ``recipe_4x`` / ``recipe_8x`` (16 / 32): batch B with per-process BN, and batch 2B with
  CGBN at k·r + warmup.

Resumable run by run: a run whose ``OUT_DIR/<run>/record.json`` says exit 0 is skipped, so the
same command continues an interrupted series. Writes ``OUT_DIR/batch_scaling.json`` (one record
per run), ``OUT_DIR/table.md`` (Table-3 style, mean ± std over seeds) and
``OUT_DIR/curves.png`` (Figures 1 and 4 via ``tools/plot_curves.py``); ``--docs`` also copies
the json and figure to ``docs/``. About 2 hours on an idle 2-core machine with the defaults.

    python experiments/batch_scaling.py --out-dir output/batch_scaling --docs
    python experiments/batch_scaling.py --smoke --out-dir /tmp/bs  # under a minute: CI
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys

from megdet_d2.utils import run_recorded, summarize_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "experiments", "shapes_hard_R18_FPN.yaml")
PRETRAIN = os.path.join(REPO, "experiments", "pretrain_backbone.py")
BASE_LR, BASE_BATCH, PROCESSES = 0.02, 4, 2
NORMS = {  # norm field -> backbone / FPN overrides
    "FrozenBN": ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", ""],
    "CGBN": ["MODEL.RESNETS.NORM", "CGBN", "MODEL.FPN.NORM", "CGBN"],
    "BN": ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN"],
}
# name -> (batch, norm, lr policy, warmup epochs, seeds)
RUNS = {
    "base": (4, "FrozenBN", "r", 0, 3),
    "bn_base": (4, "CGBN", "r", 0, 3),
    "recipe_4x": (16, "CGBN", "k*r", 1, 1),
    "recipe_8x": (32, "CGBN", "k*r", 1, 3),
    "recipe_8x_nowarmup": (32, "CGBN", "k*r", 0, 1),
    "frozen_8x": (32, "FrozenBN", "k*r", 1, 1),
    "frozen_8x_halflr": (32, "FrozenBN", "k*r/2", 1, 1),
    "perproc_bn_8x": (32, "BN", "k*r", 1, 1),
    "trend_bn2": (4, "BN", "r", 0, 3),
    "trend_bn8": (8, "CGBN", "k*r", 1, 3),
    "recipe_8x_warmup3": (32, "CGBN", "k*r", 3, 3),
}
SEEDS = (1, 2, 3)
SMOKE_RUNS = ("base", "recipe_4x")


def bn_size(batch, norm):
    """Images per BN statistic: 0 without batch statistics."""
    return {"FrozenBN": 0, "BN": batch // PROCESSES, "CGBN": batch}[norm]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=None,
                        help="run kinds (default: all; --smoke: base recipe_4x)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds a kind")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run")
    parser.add_argument("--num-train", type=int, default=800, help="training images (an epoch)")
    parser.add_argument("--num-val", type=int, default=96, help="validation images")
    parser.add_argument("--base-lr", type=float, default=BASE_LR, help="r, at batch 4")
    parser.add_argument("--pretrain-args", default="", help="extra pretrain_backbone.py flags")
    parser.add_argument("--out-dir", default=os.path.join("output", "batch_scaling"))
    parser.add_argument("--docs", action="store_true", help="also write docs/batch_scaling.*")
    parser.add_argument("--docs-dir", default=os.path.join(REPO, "docs"), help=argparse.SUPPRESS)
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep model_final.pth")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: pretrain 30 steps, base + recipe_4x on 48 images x 2 epochs",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = args.runs or list(SMOKE_RUNS)
        args.seeds, args.epochs, args.num_train, args.num_val = 1, 2, 48, 8
        args.base_lr = 0.002  # a 30-step backbone: r = 0.02 diverges (FrozenBN, no FPN norm)
        args.pretrain_args = "--steps 30 --batch 8 --num-images 8 --num-val 4 " + args.pretrain_args
    args.runs = args.runs or list(RUNS)
    args.out_dir = os.path.abspath(args.out_dir)  # the runs' working directory is the repo
    if args.epochs < 2 or args.num_train < max(RUNS[r][0] for r in args.runs):
        parser.error("need --epochs >= 2 and --num-train >= the largest batch")
    return args


def run_names(args):
    """``{run name: (kind, seed)}`` in the order they run: every kind's first seed first."""
    names = {}
    for i, seed in enumerate(SEEDS):
        for kind in args.runs:
            if i < min(RUNS[kind][4], args.seeds or len(SEEDS)):
                names[f"{kind}_s{seed}"] = (kind, seed)
    return names


def pretrain(args):
    """The pretrained checkpoint's path (made once; cached by its settings)."""
    out_dir = os.path.join(args.out_dir, "pretrained")
    cmd = [sys.executable, PRETRAIN, "--config-file", CONFIG, "--out-dir", out_dir]
    cmd += args.pretrain_args.split()
    if args.dry_run:
        print(" ".join(cmd))
        return "<pretrained.pth>"
    out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = out.strip().splitlines()
    print("\n".join(lines[-2:]), flush=True)
    with open(os.path.join(args.out_dir, "pretrained", "latest.log"), "w") as f:
        f.write(out)
    return lines[-1].split(" ", 1)[1]  # "checkpoint PATH"


def train_command(args, name, weights):
    """The train_net.py command line of one run."""
    kind, seed = run_names(args)[name]
    batch, norm, policy, warmup, _ = RUNS[kind]
    reference = {"r": batch, "k*r": BASE_BATCH, "k*r/2": 2 * BASE_BATCH}[policy]
    warmup_iters = warmup * math.ceil(args.num_train / batch)  # whole epochs
    return [
        sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", str(PROCESSES),
        "--dist-url", "auto", "--config-file", CONFIG, "MODEL.WEIGHTS", weights,
        "MEGDET.QUICKSTART.ROOT", os.path.join(args.out_dir, "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", str(args.num_train),
        "MEGDET.QUICKSTART.NUM_VAL", str(args.num_val),
        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", str(args.base_lr),
        "SOLVER.MEGDET.REFERENCE_BATCH_SIZE", str(reference),
        "SOLVER.MEGDET.SCHEDULE", "normal", "SOLVER.MEGDET.EPOCHS", str(args.epochs),
        "SOLVER.MEGDET.EVAL_PERIOD_EPOCHS", "1", "SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.WARMUP_ITERS", str(warmup_iters),
        "MEGDET.LOG_PERIOD", "1", "MEGDET.LOG_GRAD_NORM", "True", *NORMS[norm],
        "SEED", str(seed), "OUTPUT_DIR", os.path.join(args.out_dir, name),
    ]  # fmt: skip


def make_record(args, name):
    """The function that turns a finished run's folder into its record."""
    kind, seed = run_names(args)[name]
    batch, norm, policy, warmup, _ = RUNS[kind]

    def record(run_dir, rc, wall):
        summary = summarize_run(run_dir) or {"ap": [], "ar": [], "iterations": 0, "train_s": 0}
        complete = rc == 0 and len(summary["ap"]) == args.epochs
        if not args.keep_checkpoints and os.path.isfile(os.path.join(run_dir, "model_final.pth")):
            os.remove(os.path.join(run_dir, "model_final.pth"))
        return {
            "name": name, "kind": kind, "batch": batch, "bn_size": bn_size(batch, norm),
            "norm": norm, "lr": policy, "warmup": warmup > 0, "warmup_epochs": warmup,
            "init": "pretrained", "seed": seed,
            "iterations": summary["iterations"], "train_s": round(summary["train_s"], 1),
            "wall_s": round(wall, 1), "mmAP_per_epoch": summary["ap"],
            "mmAP": summary["ap"][-1] if complete else None,
            "mmAR": summary["ar"][-1] if complete else None, "exit": rc,
        }  # fmt: skip

    return record


def _mean_std(values):
    values = [v for v in values if v is not None and v == v]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0
    )
    return mean, std


def _fmt(values):
    """``mean ± std (seed, seed, ...)`` over the runs that scored, ``—`` if none did."""
    scored = [v for v in values if v is not None]
    mean, std = _mean_std(scored)
    if mean is None:
        return "—"
    if len(scored) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {std:.1f} ({', '.join(f'{v:.1f}' for v in scored)})"


def _score(value, record):
    """A run that finished (exit 0) without a single detection scores 0, not "undefined": it
    counts in the mean. A run that failed has no score."""
    return 0.0 if value is None and record["exit"] == 0 else value


def _warmup(record):
    """The warmup column: no, yes (one epoch) or N epochs. Records written before
    ``warmup_epochs`` existed had one-epoch warmups."""
    epochs = record.get("warmup_epochs", int(record["warmup"]))
    return {0: "no", 1: "yes"}.get(epochs, f"{epochs} epochs")


def table(records):
    """Table-3-style markdown: one row per run kind, mean ± std over seeds (and each seed's
    value); a finished run without detections scores 0."""
    lines = [
        "| run | batch | BN size | norm | LR | warmup | iterations | train time (s) "
        "| wall-clock (s) | mmAP | mmAR | mmAP after each epoch (mean) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = dict.fromkeys(r["kind"] for r in records)
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        first = rows[0]
        aps = [_score(r["mmAP"], r) for r in rows]
        ars = [_score(r["mmAR"], r) for r in rows]
        curves = [[_score(v, r) for v in r["mmAP_per_epoch"]] for r in rows if r["exit"] == 0]
        per_epoch = " / ".join(
            f"{_mean_std(list(c))[0]:.1f}" if _mean_std(list(c))[0] is not None else "—"
            for c in zip(*curves)
        ) if curves else "—"  # fmt: skip
        lines.append(
            f"| {kind} | {first['batch']} | {first['bn_size']} | {first['norm']} | {first['lr']} "
            f"| {_warmup(first)} | {first['iterations']} "
            f"| {_mean_std([r['train_s'] for r in rows])[0]:.0f} "
            f"| {_mean_std([r['wall_s'] for r in rows])[0]:.0f} | {_fmt(aps)} "
            f"| {_fmt(ars)} | {per_epoch} "
            f"| {','.join(str(r['exit']) for r in rows)} |"
        )
    return "\n".join(lines)


def report(args, records, docs):
    """batch_scaling.json, table.md and curves.png in OUT_DIR (and docs/ with ``docs``)."""
    data = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {PROCESSES} processes (gloo)",
        "settings": {k: getattr(args, k) for k in ("epochs", "num_train", "num_val", "base_lr")},
        "runs": records,
    }
    with open(os.path.join(args.out_dir, "batch_scaling.json"), "w") as f:
        json.dump(data, f, indent=1)
    text = table(records)
    print("\n" + text)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    first = {}  # one curve per kind: its median seed by final mmAP (no detections: 0)
    for kind in dict.fromkeys(r["kind"] for r in records):
        runs = [r for r in records if r["kind"] == kind and r["exit"] == 0]
        runs = [r for r in runs if any(v is not None for v in r["mmAP_per_epoch"])] or runs
        if runs:
            runs.sort(key=lambda r: _score(r["mmAP"], r))
            first[kind] = runs[(len(runs) - 1) // 2]["name"]
    png = os.path.join(args.out_dir, "curves.png")
    if first:
        title = (f"batch scaling, pretrained R-18 FPN, shapes_hard, {args.epochs} epochs of "
                 f"{args.num_train} images")  # fmt: skip
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_curves.py"),
                        *[os.path.join(args.out_dir, n) for n in first.values()],
                        "--labels", *first, "--out", png, "--title", title],
                       cwd=REPO, check=True)  # fmt: skip
    if docs:
        os.makedirs(args.docs_dir, exist_ok=True)
        shutil.copy(os.path.join(args.out_dir, "batch_scaling.json"), args.docs_dir)
        if first:
            shutil.copy(png, os.path.join(args.docs_dir, "batch_scaling.png"))
    return data


def main(argv=None):
    """Pretrain (cached), run what is not done yet, report; returns the report dict (the
    commands for a dry run)."""
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    weights = pretrain(args)
    names = run_names(args)
    if args.dry_run:
        commands = {name: train_command(args, name, weights) for name in names}
        for cmd in commands.values():
            print(" ".join(cmd))
        return commands
    records = [
        run_recorded(name, train_command(args, name, weights), args.out_dir, REPO,
                     make_record(args, name))
        for name in names
    ]  # fmt: skip
    return report(args, records, args.docs)


if __name__ == "__main__":
    main()
