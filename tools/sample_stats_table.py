#!/usr/bin/env python
"""Table 1 of the paper: ratio of positive to negative ROI samples at chosen epochs, per run.

Reads ``metrics.json`` (the ``sample_stats/*`` sums written by ``SampleStatsHook``, i.e. the
whole mini-batch over all processes) and ``config.yaml`` of each output directory. The ratio at
epoch e is sum(positives) / sum(negatives) over the logged iterations of epoch e (every
iteration with ``MEGDET.LOG_PERIOD: 1``, otherwise every MEGDET.LOG_PERIOD-th), in percent.

    python tools/sample_stats_table.py output/b16 output/b256 --epochs 1 6 12

Iterations per epoch come from ``SOLVER.MEGDET.ITERS_PER_EPOCH`` in config.yaml (written by the
schedule presets), else from ``--iters-per-epoch``.
"""

import argparse
import os

from megdet_d2.utils import read_config, read_metrics

KINDS = {"roi": "sample_stats/roi_num_", "rpn": "sample_stats/rpn_num_"}


def iters_per_epoch(config, fallback=None):
    """``SOLVER.MEGDET.ITERS_PER_EPOCH`` if set (> 0), else ``fallback``; error if neither."""
    value = config.get("SOLVER", {}).get("MEGDET", {}).get("ITERS_PER_EPOCH", 0)
    if value:
        return int(value)
    if fallback:
        return int(fallback)
    raise ValueError(
        "config.yaml has no SOLVER.MEGDET.ITERS_PER_EPOCH (no schedule preset); "
        "pass --iters-per-epoch"
    )


def epoch_ratio(records, ipe, epoch, kind="roi"):
    """Positives / negatives (%) over the logged iterations of ``epoch`` (1-based); None if none."""
    prefix = KINDS[kind]
    pos = neg = 0.0
    for r in records:
        if (epoch - 1) * ipe <= r["iteration"] < epoch * ipe and prefix + "pos" in r:
            pos += r[prefix + "pos"]
            neg += r[prefix + "neg"]
    return 100.0 * pos / neg if neg > 0 else None


def run_label(run_dir, config):
    batch = config.get("SOLVER", {}).get("IMS_PER_BATCH")
    name = os.path.basename(os.path.normpath(run_dir))
    return f"{name} (batch {batch})" if batch else name


def table(run_dirs, epochs, kind="roi", fallback_ipe=None):
    """Markdown lines: one row per epoch, one column per run, the ratio in percent."""
    columns = []
    for run_dir in run_dirs:
        config = read_config(run_dir)
        ipe = iters_per_epoch(config, fallback_ipe)
        records = read_metrics(run_dir)
        columns.append(
            (run_label(run_dir, config), [epoch_ratio(records, ipe, e, kind) for e in epochs])
        )
    lines = [
        f"| Epoch | {' | '.join(label for label, _ in columns)} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for i, epoch in enumerate(epochs):
        cells = ["–" if c[1][i] is None else f"{c[1][i]:.2f}" for c in columns]
        lines.append(f"| {epoch} | {' | '.join(cells)} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs", nargs="+", help="output directories (metrics.json, config.yaml)"
    )
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 6, 12])
    parser.add_argument("--kind", choices=sorted(KINDS), default="roi",
                        help="roi: ROI-head sampler (Table 1); rpn: anchor sampler")  # fmt: skip
    parser.add_argument("--iters-per-epoch", type=int, default=None,
                        help="when config.yaml has no SOLVER.MEGDET.ITERS_PER_EPOCH")  # fmt: skip
    args = parser.parse_args(argv)
    if any(e < 1 for e in args.epochs):
        parser.error("--epochs are 1-based")
    try:
        lines = table(args.run_dirs, args.epochs, args.kind, args.iters_per_epoch)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print(f"Ratio positive / negative {args.kind.upper()} samples (%), whole mini-batch:\n")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
