#!/usr/bin/env python
"""MegDet's central claim, the paper's way: from a pretrained backbone, BN trained by CGBN,
8x the mini-batch in the same epochs reaches the small batch's accuracy.

Every run fine-tunes ``configs/experiments/shapes_hard_R18_FPN.yaml`` (R-18 FPN on the harder
built-in data) from the backbone ``experiments/pretrain_backbone.py`` makes (once, cached), in
2 CPU processes, for the same number of epochs, the "normal" preset stretched to them
(``SOLVER.MEGDET.EPOCHS``: x0.1 at 8/11 and 10/11 of training), evaluating every epoch. The
rate r = 0.005 is set at the base batch B = 4 (2 x 2, ``REFERENCE_BATCH_SIZE 4``): detectron2's
and the paper's 0.02 at batch 16, scaled to 4 by the rule itself, so 8x runs at the paper's
batch-32 rate 0.04. k = batch / 4; a warmup lasts one epoch, from r to k·r. An epoch is 3,200
images, so batch 32 makes 100 updates per epoch (issue #26: the paper's regime of updates).

Issue #26's runs (the default), in the order they run:

* ``base`` / ``recipe_8x`` seed 1, then the update-count trend ``base_n800``,
  ``recipe_8x_n800``, ``base_n1600``, ``recipe_8x_n1600`` (800 / 1,600 images an epoch, with
  the 3,200 of ``base`` / ``recipe_8x``: 25, 50, 100 updates per epoch at 8x) and its
  FrozenBN line ``frozen_8x_n800``, ``frozen_8x_n1600`` (is the gap the updates, or training BN
  in few of them?), then seeds 2 and 3 of ``base`` and ``recipe_8x``, then the rest;
* ``base``: batch B, FrozenBN backbone (pretrained statistics), no FPN norm, r (3 seeds);
* ``recipe_4x`` / ``recipe_8x`` / ``recipe_16x``: 4B / 8B / 16B, CGBN, k·r with warmup;
* ``frozen_8x``: 8B, FrozenBN, k·r with warmup (Table 2: batch 32 without BN);
* ``base_noise``: ``base`` with the gradient noise scale measured (``MEGDET.NOISE_SCALE``):
  B_simple after the first and last epoch against the batches (the weights equal ``base``'s);
* ``recipe_8x_long`` / ``base_long``: the "long" preset's shape over 18/11 of the epochs (13).

Issue #18's other kinds stay selectable with ``--runs`` (they run at the settings given):
``bn_base`` (batch B, CGBN, BN size 4), ``recipe_8x_nowarmup``, ``recipe_8x_warmup3`` (a
3-epoch warmup), ``frozen_8x_halflr`` (k·r/2), ``perproc_bn_8x`` (per-process BN, BN size 16),
``trend_bn2`` / ``trend_bn8`` (the BN-size trend).

Resumable run by run: a run whose ``OUT_DIR/<run>/record.json`` says exit 0 (or that it
diverged: a result, as in Table 2) is skipped, so the same command continues an interrupted
series. Each finished run is also archived (its record,
config and a thinned metrics.json) under ``--records-dir`` (tracked in git,
``experiments/records/batch_scaling``): a fresh clone restores the runs whose settings match
and goes on with the rest. Writes ``OUT_DIR/batch_scaling.json`` (one record per run),
``OUT_DIR/table.md`` (Table-3 style, mean ± std over seeds; each recipe batch's gap to the
base; the update-count trend; B_simple; the last epoch's training loss) and
``OUT_DIR/curves.png`` (Figures 1 and 4 via ``tools/plot_curves.py``); ``--docs`` also copies
the json and figures to ``docs/``; ``--report-only`` trains nothing and reports what has
finished. About 5.6 hours on an idle 2-core machine with the defaults (docs/experiments.md).

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
from typing import NamedTuple, Optional

from megdet_d2.utils import finished, read_metrics, read_record, run_recorded, summarize_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "experiments", "shapes_hard_R18_FPN.yaml")
PRETRAIN = os.path.join(REPO, "experiments", "pretrain_backbone.py")
RECORDS = os.path.join(REPO, "experiments", "records", "batch_scaling")
BASE_LR, BASE_BATCH, PROCESSES, NUM_TRAIN = 0.005, 4, 2, 3200
LONG_EPOCHS = 18 / 11  # "long" ends at epoch 18 where "normal" ends at 11
NORMS = {  # norm field -> backbone / FPN overrides
    "FrozenBN": ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", ""],
    "CGBN": ["MODEL.RESNETS.NORM", "CGBN", "MODEL.FPN.NORM", "CGBN"],
    "BN": ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN"],
}


class Kind(NamedTuple):
    """One kind of run: batch, norm, LR policy, warmup epochs, seeds, and what it changes of
    the series' settings (training images; the LR schedule's shape)."""

    batch: int
    norm: str
    lr: str
    warmup: int
    seeds: int
    num_train: Optional[int] = None  # None: --num-train
    schedule: str = "normal"
    opts: tuple = ()  # further train_net.py overrides


RUNS = {
    # issue #26, in priority order (see run_names)
    "base": Kind(4, "FrozenBN", "r", 0, 3),
    "recipe_8x": Kind(32, "CGBN", "k*r", 1, 3),
    "base_n800": Kind(4, "FrozenBN", "r", 0, 1, num_train=800),
    "recipe_8x_n800": Kind(32, "CGBN", "k*r", 1, 1, num_train=800),
    "base_n1600": Kind(4, "FrozenBN", "r", 0, 1, num_train=1600),
    "recipe_8x_n1600": Kind(32, "CGBN", "k*r", 1, 1, num_train=1600),
    "recipe_4x": Kind(16, "CGBN", "k*r", 1, 1),
    "recipe_16x": Kind(64, "CGBN", "k*r", 1, 1),
    "frozen_8x": Kind(32, "FrozenBN", "k*r", 1, 1),
    # base with the gradient noise scale measured (issue #24): weights as base_s1's, bit for bit
    "base_noise": Kind(4, "FrozenBN", "r", 0, 1, opts=("MEGDET.NOISE_SCALE", "True")),
    # Figure 4: recipe_8x long first (the issue asks for it; base long "if time allows")
    "recipe_8x_long": Kind(32, "CGBN", "k*r", 1, 1, schedule="long"),
    "base_long": Kind(4, "FrozenBN", "r", 0, 1, schedule="long"),
    # the trend without BN: is it the updates, or training BN in few updates? (item 5)
    "frozen_8x_n800": Kind(32, "FrozenBN", "k*r", 1, 1, num_train=800),
    "frozen_8x_n1600": Kind(32, "FrozenBN", "k*r", 1, 1, num_train=1600),
    # issue #18's other kinds: --runs only
    "bn_base": Kind(4, "CGBN", "r", 0, 3),
    "recipe_8x_nowarmup": Kind(32, "CGBN", "k*r", 0, 1),
    "frozen_8x_halflr": Kind(32, "FrozenBN", "k*r/2", 1, 1),
    "perproc_bn_8x": Kind(32, "BN", "k*r", 1, 1),
    "trend_bn2": Kind(4, "BN", "r", 0, 3),
    "trend_bn8": Kind(8, "CGBN", "k*r", 1, 3),
    "recipe_8x_warmup3": Kind(32, "CGBN", "k*r", 3, 3),
}
DEFAULT_RUNS = tuple(RUNS)[: list(RUNS).index("frozen_8x_n1600") + 1]
CORE = ("base", "recipe_8x")  # the claim: first seed early, the others before the rest
TREND = {  # the update-count trend: kind -> the core kind it shrinks
    "base_n800": "base", "recipe_8x_n800": "recipe_8x",
    "base_n1600": "base", "recipe_8x_n1600": "recipe_8x",
    "frozen_8x_n800": "frozen_8x", "frozen_8x_n1600": "frozen_8x",
}  # fmt: skip
FROZEN = "frozen_8x"  # the trend's run without BN, beside recipe_8x (seed 1)
SEEDS = (1, 2, 3)
BATCH_KINDS = ("recipe_4x", "recipe_8x", "recipe_16x")  # the batch series on the base's images
SMOKE_RUNS = ("base", "recipe_4x")


def bn_size(batch, norm):
    """Images per BN statistic: 0 without batch statistics."""
    return {"FrozenBN": 0, "BN": batch // PROCESSES, "CGBN": batch}[norm]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=None,
        help="run kinds (default: issue #26's; --smoke: base recipe_4x)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds a kind")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run")
    parser.add_argument(
        "--num-train", type=int, default=NUM_TRAIN, help="training images (an epoch)"
    )
    parser.add_argument("--num-val", type=int, default=96, help="validation images")
    parser.add_argument("--base-lr", type=float, default=BASE_LR, help="r, at batch 4")
    parser.add_argument("--pretrain-args", default="", help="extra pretrain_backbone.py flags")
    parser.add_argument("--out-dir", default=os.path.join("output", "batch_scaling"))
    parser.add_argument("--records-dir", default=None,
                        help="finished runs archived here (default "
                        "experiments/records/batch_scaling; --smoke: OUT_DIR/records)")  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="also write docs/batch_scaling.*")
    parser.add_argument("--docs-dir", default=os.path.join(REPO, "docs"), help=argparse.SUPPRESS)
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep model_final.pth")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: pretrain 30 steps, base + recipe_4x on 48 images x 2 epochs",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the finished (or restored) runs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = args.runs or list(SMOKE_RUNS)
        args.seeds, args.epochs, args.num_train, args.num_val = 1, 2, 48, 8
        args.base_lr = 0.002  # a 30-step backbone: r = 0.02 diverges (FrozenBN, no FPN norm)
        args.pretrain_args = "--steps 30 --batch 8 --num-images 8 --num-val 4 " + args.pretrain_args
    args.runs = args.runs or list(DEFAULT_RUNS)
    args.out_dir = os.path.abspath(args.out_dir)  # the runs' working directory is the repo
    if args.records_dir is None:
        args.records_dir = os.path.join(args.out_dir, "records") if args.smoke else RECORDS
    if args.epochs < 2 or any(num_train(args, k) < RUNS[k].batch for k in args.runs):
        parser.error("need --epochs >= 2 and --num-train >= the largest batch")
    return args


def num_train(args, kind):
    """Training images (one epoch) of a kind's runs."""
    return RUNS[kind].num_train or args.num_train


def epochs(args, kind):
    """Epochs of a kind's runs: "long" lasts 18/11 of the "normal" epochs."""
    return round(args.epochs * LONG_EPOCHS) if RUNS[kind].schedule == "long" else args.epochs


def run_names(args):
    """``{run name: (kind, seed)}`` in the order they run: the core kinds' first seed and the
    update-count trend first, then the core's other seeds, then every other kind's seeds (each
    seed across the kinds before the next)."""

    def tier(kind, seed):
        if kind in CORE:
            return 0 if seed == SEEDS[0] else 1
        return 0 if kind in TREND else 2

    order = []
    for i, seed in enumerate(SEEDS):
        for k, kind in enumerate(args.runs):
            if i < min(RUNS[kind].seeds, args.seeds or len(SEEDS)):
                order.append(((tier(kind, seed), i, k), f"{kind}_s{seed}", kind, seed))
    return {name: (kind, seed) for _, name, kind, seed in sorted(order)}


def settings(args, kind):
    """What a kind's runs were trained with, beyond their kind: a record restored from the
    archive must match it."""
    return {
        "num_train": num_train(args, kind),
        "num_val": args.num_val,
        "base_lr": args.base_lr,
        "epochs": epochs(args, kind),
        "schedule": RUNS[kind].schedule,
    }


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
    k = RUNS[kind]
    reference = {"r": k.batch, "k*r": BASE_BATCH, "k*r/2": 2 * BASE_BATCH}[k.lr]
    warmup_iters = k.warmup * math.ceil(num_train(args, kind) / k.batch)  # whole epochs
    return [
        sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", str(PROCESSES),
        "--dist-url", "auto", "--config-file", CONFIG, "MODEL.WEIGHTS", weights,
        "MEGDET.QUICKSTART.ROOT", os.path.join(args.out_dir, "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", str(num_train(args, kind)),
        "MEGDET.QUICKSTART.NUM_VAL", str(args.num_val),
        "SOLVER.IMS_PER_BATCH", str(k.batch), "SOLVER.BASE_LR", str(args.base_lr),
        "SOLVER.MEGDET.REFERENCE_BATCH_SIZE", str(reference),
        "SOLVER.MEGDET.SCHEDULE", k.schedule, "SOLVER.MEGDET.EPOCHS", str(epochs(args, kind)),
        "SOLVER.MEGDET.EVAL_PERIOD_EPOCHS", "1", "SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.WARMUP_ITERS", str(warmup_iters),
        "MEGDET.LOG_PERIOD", "1", "MEGDET.LOG_GRAD_NORM", "True", *NORMS[k.norm], *k.opts,
        "SEED", str(seed), "OUTPUT_DIR", os.path.join(args.out_dir, name),
    ]  # fmt: skip


def make_record(args, name):
    """The function that turns a finished run's folder into its record (and archives it)."""
    kind, seed = run_names(args)[name]
    k = RUNS[kind]

    def record(run_dir, rc, wall):
        summary = summarize_run(run_dir) or {"ap": [], "ar": [], "iterations": 0, "train_s": 0}
        metrics = run_metrics(run_dir)
        complete = rc == 0 and len(summary["ap"]) == epochs(args, kind)
        if not args.keep_checkpoints and os.path.isfile(os.path.join(run_dir, "model_final.pth")):
            os.remove(os.path.join(run_dir, "model_final.pth"))
        rec = {
            "name": name, "kind": kind, "batch": k.batch, "bn_size": bn_size(k.batch, k.norm),
            "norm": k.norm, "lr": k.lr, "warmup": k.warmup > 0, "warmup_epochs": k.warmup,
            "init": "pretrained", "seed": seed, **settings(args, kind),
            "updates_per_epoch": math.ceil(num_train(args, kind) / k.batch),
            "iterations": summary["iterations"], "train_s": round(summary["train_s"], 1),
            "wall_s": round(wall, 1), "mmAP_per_epoch": summary["ap"],
            "mmAP": summary["ap"][-1] if complete else None,
            "mmAR": summary["ar"][-1] if complete else None, "exit": rc,
            "b_simple_per_epoch": noise_scale_per_epoch(metrics),
            "last_epoch_loss": last_epoch_loss(metrics, summary["iterations"], epochs(args, kind))
            if complete else None, "diverged": diverged(run_dir, rc),
        }  # fmt: skip
        if finished(rec):
            archive(run_dir, os.path.join(args.records_dir, name), rec)
        return rec

    return record


def diverged(run_dir, rc):
    """A failed run that stopped on a FloatingPointError (non-finite losses or predictions)
    diverged: a result (Table 2's "failed"), archived and not run again, unlike a crash or a
    kill."""
    path = os.path.join(run_dir, "train.log")
    if rc == 0 or not os.path.isfile(path):
        return False
    with open(path) as f:
        return "FloatingPointError" in f.read()


ARCHIVED = ("record.json", "config.yaml", "metrics.json", "train.log")
THIN = 20  # metrics.json keeps every evaluation and every THIN-th training line


def run_metrics(run_dir):
    """``read_metrics(run_dir)``, or [] when the run wrote no metrics.json."""
    return read_metrics(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.json")) else []


def noise_scale_per_epoch(metrics):
    """B_simple (``noise_scale/b_simple``, MEGDET.NOISE_SCALE) at each evaluation, i.e. at the
    end of each epoch, from a run's ``run_metrics``; [] when the run did not measure it."""
    latest, values = None, []
    for r in metrics:
        latest = r.get("noise_scale/b_simple", latest)
        if "bbox/AP" in r and latest is not None:
            values.append(latest)
    return values


def last_epoch_loss(metrics, iterations, num_epochs):
    """Mean ``total_loss`` over the last epoch's iterations of a run's ``run_metrics``: how far
    the optimisation got, beside what the evaluation says; None without them."""
    start = iterations * (num_epochs - 1) / num_epochs
    return _mean([r["total_loss"] for r in metrics
                  if "total_loss" in r and r["iteration"] >= start])  # fmt: skip


def loss_table(records):
    """Per kind, the records' ``last_epoch_loss``: the mean and each seed's."""
    lines = ["| run | training loss, last epoch (mean; each seed) |", "|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in records):
        values = [r["last_epoch_loss"] for r in records
                  if r["kind"] == kind and r.get("last_epoch_loss") is not None]  # fmt: skip
        if values:
            each = ", ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {kind} | {_mean(values):.3f} ({each}) |")
    return "\n".join(lines) if len(lines) > 2 else ""


def noise_table(records):
    """B_simple after the first and the last epoch of each run that measured it, and where the
    series' batches stand against it (batch / B_simple)."""
    batches = sorted({r["batch"] for r in records})
    lines = [
        "| run | epoch | B_simple (images) | "
        + " | ".join(f"batch {b} / B_simple" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]  # fmt: skip
    for r in records:
        values = r.get("b_simple_per_epoch") or []
        for epoch in sorted({1, len(values)}) if values else ():
            v = values[epoch - 1]
            ratios = " | ".join(f"{b / v:.2g}" if v and v > 0 else "—" for b in batches)
            lines.append(f"| {r['name']} | {epoch} | {v:.3g} | {ratios} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def archive(run_dir, dest, rec):
    """A finished run's record, config, a thinned metrics.json (what the table and figures
    read) and the log's last lines, to ``dest``: small enough to commit."""
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(run_dir, "config.yaml"), dest)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        lines = f.read().splitlines()
    kept = [
        line for i, line in enumerate(lines)
        if '"bbox/AP"' in line or i % THIN == THIN - 1 or i == len(lines) - 1
    ]  # fmt: skip
    with open(os.path.join(dest, "metrics.json"), "w") as f:
        f.write("\n".join(kept) + "\n")
    with open(os.path.join(run_dir, "train.log")) as f:
        tail = f.readlines()[-40:]
    with open(os.path.join(dest, "train.log"), "w") as f:
        f.writelines(tail)
    with open(os.path.join(dest, "record.json"), "w") as f:
        json.dump(rec, f, indent=1)


def restore(args, name):
    """Copy an archived run with this run's settings back into OUT_DIR (so that it is skipped
    and reported); True if there was one."""
    kind, _ = run_names(args)[name]
    src, run_dir = os.path.join(args.records_dir, name), os.path.join(args.out_dir, name)
    path = os.path.join(src, "record.json")
    if os.path.isfile(os.path.join(run_dir, "record.json")) or not os.path.isfile(path):
        return False
    with open(path) as f:
        rec = json.load(f)
    if not finished(rec) or any(rec.get(k) != v for k, v in settings(args, kind).items()):
        return False
    os.makedirs(run_dir, exist_ok=True)
    for file in ARCHIVED:
        shutil.copy(os.path.join(src, file), run_dir)
    print(f"== {name}: restored from {os.path.relpath(src, REPO)}", flush=True)
    return True


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


def _mean(values):
    return _mean_std([v for v in values if v is not None])[0]


def table(records):
    """Table-3-style markdown: one row per run kind, mean ± std over seeds (and each seed's
    value); a finished run without detections scores 0."""
    lines = [
        "| run | batch | BN size | norm | LR | warmup | images / epoch | updates / epoch "
        "| iterations | train time (s) | wall-clock (s) | mmAP | mmAR "
        "| mmAP after each epoch (mean) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = dict.fromkeys(r["kind"] for r in records)
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        first = rows[0]
        aps = [_score(r["mmAP"], r) for r in rows]
        ars = [_score(r["mmAR"], r) for r in rows]
        curves = [[_score(v, r) for v in r["mmAP_per_epoch"]] for r in rows if r["exit"] == 0]
        ap = _fmt(aps)
        if any(r.get("diverged") for r in rows):
            at = ", ".join(str(r["iterations"]) for r in rows if r.get("diverged"))
            ap = ("" if ap == "—" else f"{ap}; ") + f"diverged at iteration {at}"
        per_epoch = " / ".join(
            f"{_mean(c):.1f}" if _mean(c) is not None else "—" for c in zip(*curves)
        ) if curves else "—"  # fmt: skip
        lines.append(
            f"| {kind} | {first['batch']} | {first['bn_size']} | {first['norm']} | {first['lr']} "
            f"| {_warmup(first)} | {first.get('num_train', '—')} "
            f"| {first.get('updates_per_epoch', '—')} | {first['iterations']} "
            f"| {_mean([r['train_s'] for r in rows]):.0f} "
            f"| {_mean([r['wall_s'] for r in rows]):.0f} | {ap} "
            f"| {_fmt(ars)} | {per_epoch} "
            f"| {','.join(str(r['exit']) for r in rows)} |"
        )
    return "\n".join(lines)


def trend(records):
    """The update-count trend (issue #26): for each epoch size with a ``base`` and a
    ``recipe_8x`` run ("normal" shape), updates per epoch at 8x and the gap, seed 1 (the one
    seed every size has) and the mean over the seeds there are; and ``frozen_8x``'s seed 1
    (8x without BN) where it ran, or the iteration where it diverged. ``[]`` if no size has
    both core kinds."""
    by = {}
    for r in records:
        kind = TREND.get(r["kind"], r["kind"])
        normal = r.get("schedule", "normal") == "normal"
        if kind in CORE + (FROZEN,) and normal and "num_train" in r:
            by.setdefault(r["num_train"], {}).setdefault(kind, []).append(r)

    def seed1(runs):
        return next((r for r in runs if r["seed"] == SEEDS[0]), None)

    def score(record):
        return None if record is None else _score(record["mmAP"], record)

    rows = []
    for images in sorted(by):
        if not set(CORE) <= set(by[images]):
            continue
        base, big = (by[images][k] for k in CORE)
        means = [_mean([_score(r["mmAP"], r) for r in runs]) for runs in (base, big)]
        frozen = seed1(by[images].get(FROZEN, []))
        rows.append({
            "images": images, "updates_per_epoch": big[0]["updates_per_epoch"],
            "updates": big[0]["iterations"], "base_s1": score(seed1(base)),
            "recipe_8x_s1": score(seed1(big)), "base_mean": means[0], "recipe_8x_mean": means[1],
            "seeds": (len(base), len(big)), "frozen_8x_s1": score(frozen),
            "frozen_8x_diverged": frozen["iterations"] if frozen and frozen.get("diverged")
            else None,
        })  # fmt: skip
    return rows


def trend_table(rows):
    """``trend(records)`` as markdown."""

    def num(v):
        return "—" if v is None else f"{v:.1f}"

    def gap(a, b):
        return "—" if a is None or b is None else f"{b - a:+.1f}"

    lines = [
        "| images / epoch | updates / epoch at 8× | updates at 8× | base (seed 1) "
        "| recipe_8x (seed 1) | gap (seed 1) | gap (mean: base, recipe_8x seeds) "
        "| frozen_8x (seed 1) | frozen_8x gap (seed 1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in rows:
        lines.append(
            f"| {t['images']} | {t['updates_per_epoch']} | {t['updates']} | {num(t['base_s1'])} "
            f"| {num(t['recipe_8x_s1'])} | {gap(t['base_s1'], t['recipe_8x_s1'])} "
            f"| {gap(t['base_mean'], t['recipe_8x_mean'])} ({t['seeds'][0]}, {t['seeds'][1]}) "
            + (f"| diverged (iteration {t['frozen_8x_diverged']}) | — |" if t["frozen_8x_diverged"]
               else f"| {num(t['frozen_8x_s1'])} | {gap(t['base_s1'], t['frozen_8x_s1'])} |")
        )  # fmt: skip
    return "\n".join(lines)


def batch_gaps(records):
    """Each recipe batch's gap to ``base`` at the series' epoch size ("normal" shape, means over
    seeds), with its updates per epoch: does the gap follow the batch or the updates?"""
    runs = {}
    for r in records:
        if r["kind"] in ("base",) + BATCH_KINDS and r.get("schedule", "normal") == "normal":
            runs.setdefault(r["kind"], []).append(r)
    base = _mean([_score(r["mmAP"], r) for r in runs.get("base", [])])
    points = []
    for kind in BATCH_KINDS:
        mean = _mean([_score(r["mmAP"], r) for r in runs.get(kind, [])])
        if base is not None and mean is not None:
            first = runs[kind][0]
            points.append(
                {"kind": kind, "batch": first["batch"], "seeds": len(runs[kind]),
                 "updates_per_epoch": first["updates_per_epoch"], "gap": mean - base}
            )  # fmt: skip
    return points


def batch_gap_table(points):
    """``batch_gaps(records)`` as markdown."""
    lines = ["| run | batch | updates / epoch | gap to base (means; seeds) |", "|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['kind']} | {p['batch']} | {p['updates_per_epoch']} "
                     f"| {p['gap']:+.1f} ({p['seeds']}) |")  # fmt: skip
    return "\n".join(lines)


def plot_trend(rows, out_path, points=()):
    """recipe_8x's gap to the base against updates per epoch at 8x (seed 1 and mean), frozen_8x's
    (seed 1) where it ran, and each recipe batch's gap at the series' epoch size
    (``batch_gaps``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [t["updates_per_epoch"] for t in rows]
    for key, label in (("s1", "8× CGBN, seed 1"), ("mean", "8× CGBN, mean over seeds")):
        y = [t[f"recipe_8x_{key}"] - t[f"base_{key}"] if None not in
             (t[f"recipe_8x_{key}"], t[f"base_{key}"]) else float("nan") for t in rows]  # fmt: skip
        ax.plot(x, y, marker="o", label=label)
    frozen = [(t["updates_per_epoch"], t["frozen_8x_s1"] - t["base_s1"]) for t in rows
              if None not in (t["frozen_8x_s1"], t["base_s1"])]  # fmt: skip
    if frozen:
        ax.plot(*zip(*frozen), marker="^", linestyle="--", label="8× FrozenBN, seed 1")
    failed = [(t["updates_per_epoch"], -t["base_s1"]) for t in rows
              if t["frozen_8x_diverged"] and t["base_s1"] is not None]  # fmt: skip
    if failed:
        ax.scatter(*zip(*failed), marker="x", color="red", zorder=3,
                   label="8× FrozenBN diverged (no model: −base)")  # fmt: skip
    if points:
        px = [p["updates_per_epoch"] for p in points]
        ax.scatter(px, [p["gap"] for p in points], marker="s", color="black", zorder=3,
                   label="4× / 8× / 16× on the same images, mean")  # fmt: skip
        for p in points:
            ax.annotate(f"{p['batch'] // BASE_BATCH}×", (p["updates_per_epoch"], p["gap"]),
                        textcoords="offset points", xytext=(5, -10))  # fmt: skip
        x = sorted(set(x) | set(px))
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set(xscale="log", xticks=x, xticklabels=[str(v) for v in x],
           xlabel="updates per epoch (8 epochs)",
           ylabel="recipe − base (mmAP)", title="gap to the base vs updates per epoch")  # fmt: skip
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def report(args, records, docs):
    """batch_scaling.json, table.md, curves.png (and trend.png) in OUT_DIR (and docs/ with
    ``docs``)."""
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
    rows = trend(records)
    points = batch_gaps(records)
    if points:
        text += "\n\n" + batch_gap_table(points)
    if rows:
        text += "\n\n" + trend_table(rows)
        plot_trend(rows, os.path.join(args.out_dir, "trend.png"), points)
    noise = noise_table(records)
    if noise:
        text += "\n\n" + noise
    losses = loss_table(records)
    if losses:
        text += "\n\n" + losses
    print("\n" + text)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    first = {}  # one curve per kind at --num-train: its median seed by final mmAP
    for kind in dict.fromkeys(r["kind"] for r in records if kind_in_figure(args, r["kind"])):
        runs = [r for r in records if r["kind"] == kind and r["exit"] == 0]
        runs = [r for r in runs if any(v is not None for v in r["mmAP_per_epoch"])] or runs
        if runs:
            runs.sort(key=lambda r: _score(r["mmAP"], r))
            first[kind] = runs[(len(runs) - 1) // 2]["name"]
    png = os.path.join(args.out_dir, "curves.png")
    if first:
        title = (f"batch scaling, pretrained R-18 FPN, shapes_hard, {args.epochs} epochs of "
                 f"{args.num_train} images (long: {epochs(args, 'base_long')})")  # fmt: skip
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_curves.py"),
                        *[os.path.join(args.out_dir, n) for n in first.values()],
                        "--labels", *first, "--out", png, "--title", title],
                       cwd=REPO, check=True)  # fmt: skip
    if docs:
        os.makedirs(args.docs_dir, exist_ok=True)
        shutil.copy(os.path.join(args.out_dir, "batch_scaling.json"), args.docs_dir)
        if first:
            shutil.copy(png, os.path.join(args.docs_dir, "batch_scaling.png"))
        if rows:
            shutil.copy(os.path.join(args.out_dir, "trend.png"),
                        os.path.join(args.docs_dir, "batch_scaling_trend.png"))  # fmt: skip
    return data


def kind_in_figure(args, kind):
    """Figures 1 / 4 show the kinds at the series' epoch size (the trend has its own)."""
    return num_train(args, kind) == args.num_train


def main(argv=None):
    """Pretrain (cached), run what is not done yet, report; returns the report dict (the
    commands for a dry run)."""
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    names = run_names(args)
    restored = [] if args.dry_run else [restore(args, name) for name in names]
    if args.report_only:  # e.g. while the series is still running, or on a fresh clone
        records = [read_record(os.path.join(args.out_dir, name)) for name in names]
        return report(args, [r for r in records if r is not None], args.docs)
    weights = pretrain(args) if args.dry_run or not all(restored) else None  # none to train
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
