"""Run a series of ``train_net.py`` command lines, one after the other (the experiments)."""

import os
import subprocess
import time

__all__ = ["run_training_commands"]


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
