#!/usr/bin/env python
"""Are a trained model's BN running statistics what its weights need? (issue #18, item 4)

A run trained with CGBN is evaluated with the running mean / variance its BN layers averaged
during training (momentum 0.1). If those statistics lag behind the weights (a large rate moves
the weights faster than the average follows), evaluation suffers although the weights are fine.
This script takes a finished run (``config.yaml`` + ``model_final.pth``, e.g. from
``batch_scaling.py --keep-checkpoints``), evaluates it as trained, re-estimates every BN layer's
statistics on training batches with the final weights (fvcore's ``update_bn_stats``, detectron2's
PreciseBN), reports how far the running statistics were from them, and evaluates again. Equal
mmAP before and after: the running statistics are not the cause of a low score.

    python experiments/bn_stats_check.py output/batch_scaling/recipe_8x_s1 --out bn_check.json
"""

import argparse
import itertools
import json
import logging
import os
import statistics

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

import megdet_d2  # noqa: F401  (registration: CGBN, the LR scheduler)
from megdet_d2.config import add_megdet_config
from megdet_d2.data import register_quickstart_datasets
from megdet_d2.evaluation import MegDetCOCOEvaluator


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run: config.yaml and model_final.pth")
    parser.add_argument("--weights", default=None, help="default: RUN_DIR/model_final.pth")
    parser.add_argument("--batches", type=int, default=25, help="training batches to average")
    parser.add_argument("--out", default=None, help="also write the report as json here")
    return parser.parse_args(argv)


def evaluate(cfg, model):
    """Box mmAP / mmAR on the config's first test set (model in eval mode); a model without a
    single detection scores 0, as in ``batch_scaling.py``'s table."""
    name = cfg.DATASETS.TEST[0]
    evaluator = MegDetCOCOEvaluator(name, output_dir=None)
    results = inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluator)
    box = results.get("bbox", {})
    return tuple(round(v, 2) if v == v else 0.0 for v in (box.get("AP", 0.0), box.get("AR", 0.0)))


def bn_layers(model):
    """``{name: module}`` of every layer with batch statistics (CGBN / BN; not FrozenBN)."""
    found = set(get_bn_modules(model))
    return {n: m for n, m in model.named_modules() if m in found}


def statistics_gap(before, layers):
    """Per layer, how far the running statistics ``before`` are from the re-estimated ones:
    the mean's shift in re-estimated standard deviations (median over channels) and the
    variance ratio running / re-estimated (median over channels)."""
    rows = []
    for name, m in layers.items():
        mean, var = before[name]
        std = m.running_var.sqrt().clamp_min(1e-5)
        shift = ((mean - m.running_mean).abs() / std).median().item()
        ratio = (var / m.running_var.clamp_min(1e-10)).median().item()
        rows.append(
            {"layer": name, "mean_shift_std": round(shift, 3), "var_ratio": round(ratio, 3)}
        )
    return rows


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger(name="megdet_d2")
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(os.path.join(args.run_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    register_quickstart_datasets(cfg)
    model = build_model(cfg)  # one process: CGBN's statistics are this process's batch
    weights = args.weights or os.path.join(args.run_dir, "model_final.pth")
    DetectionCheckpointer(model).load(weights)
    layers = bn_layers(model)
    if not layers:
        raise SystemExit(f"{weights}: no BN layer with batch statistics (FrozenBN only?)")
    model.eval()
    as_trained = evaluate(cfg, model)
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}
    loader = build_detection_train_loader(cfg)  # SOLVER.IMS_PER_BATCH images per batch
    model.train()
    with torch.no_grad(), EventStorage():  # the training forward logs to an event storage
        update_bn_stats(model, itertools.islice(iter(loader), args.batches), args.batches)
    model.eval()
    re_estimated = evaluate(cfg, model)
    rows = statistics_gap(before, layers)
    report = {
        "run_dir": args.run_dir,
        "weights": weights,
        "batches": args.batches,
        "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "mmAP_mmAR_running_stats": as_trained,
        "mmAP_mmAR_re_estimated_stats": re_estimated,
        "bn_layers": len(rows),
        "mean_shift_std_median": round(statistics.median(r["mean_shift_std"] for r in rows), 3),
        "var_ratio_median": round(statistics.median(r["var_ratio"] for r in rows), 3),
        "largest_mean_shifts": sorted(rows, key=lambda r: -r["mean_shift_std"])[:5],
    }
    logger.info("BN statistics check:\n" + json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(report, layers=rows), f, indent=1)
    logging.shutdown()
    return report


if __name__ == "__main__":
    main()
