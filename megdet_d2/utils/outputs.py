"""Read a training run's output directory: ``metrics.json`` and the dumped ``config.yaml``.

Detectron2's ``JSONWriter`` appends one line per logged iteration. A run resumed from a
checkpoint appends again from the checkpoint's iteration, so the iterations the killed run had
logged past its last checkpoint appear twice; the resumed run's values are the ones that count.
"""

import json
import os

import yaml

__all__ = ["read_config", "read_metrics"]


def read_metrics(run_dir):
    """``run_dir/metrics.json`` as one dict per logged iteration, sorted by iteration.

    Lines of the same iteration are merged in file order, later values winning (a resumed run
    overrides what the interrupted run logged for the iterations it repeats).
    """
    merged = {}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                merged.setdefault(record["iteration"], {}).update(record)
    return [merged[it] for it in sorted(merged)]


def read_config(run_dir):
    """``run_dir/config.yaml`` as nested dicts ({} when there is none)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}
