"""Run ``train_net.py`` command lines one after the other and summarise each run (the
experiments): launching, per-run records, resuming a series run by run."""

import json
import os
import subprocess
import time

from .outputs import read_metrics

__all__ = ["finished", "read_record", "run_recorded", "run_training_commands", "summarize_run"]

RECORD = "record.json"  # a finished run's record, in its output folder


def run_training_commands(commands, out_dir, cwd, dry_run=False):
    """Run ``{name: command line}`` in order, each logging to ``out_dir/name/train.log``;
    ``dry_run``: only print them.

    Returns:
        ``{name: (exit status, wall-clock seconds)}`` ({} for a dry run).
    """
    if dry_run:
        for cmd in commands.values():
            print(" ".join(cmd))
        return {}
    results = {}
    for name, cmd in commands.items():
        run_dir = os.path.join(out_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        with open(os.path.join(run_dir, "train.log"), "w") as log:
            rc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
        results[name] = (rc, time.monotonic() - start)
        print(f"   exit {rc} after {results[name][1]:.0f} s", flush=True)
    return results


def summarize_run(run_dir):
    """AP / AR at each evaluation, iterations and training seconds (the per-iteration ``time``
    integrated over iterations: evaluation and hooks excluded) of one run; None without
    metrics.json."""
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
        "ar": [r.get("bbox/AR") for r in evals],
        "iterations": max((r["iteration"] for r in records if "lr" in r), default=-1) + 1,
        "train_s": seconds,
    }


def read_record(run_dir):
    """The run's ``record.json`` (None if the run has not finished)."""
    path = os.path.join(run_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(record):
    """Whether a run's record is a result: it exited 0, or it diverged (a result, not an
    accident like a crash or a kill, which is run again)."""
    return record.get("exit") == 0 or bool(record.get("diverged"))


def run_recorded(name, cmd, out_dir, cwd, make_record, rerun_failed=True):
    """Run one command unless ``out_dir/name/record.json`` exists and is ``finished`` (any
    record, when not ``rerun_failed``), then write its record: ``make_record(run_dir, exit
    status, wall-clock seconds)`` -> dict. Returns the record."""
    run_dir = os.path.join(out_dir, name)
    record = read_record(run_dir)
    if record is not None and (finished(record) or not rerun_failed):
        print(f"== {name}: done before (record.json), skipped", flush=True)
        return record
    rc, wall = run_training_commands({name: cmd}, out_dir, cwd)[name]
    record = make_record(run_dir, rc, wall)
    tmp = os.path.join(run_dir, RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, RECORD))  # complete or absent
    return record
