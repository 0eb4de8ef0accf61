#!/usr/bin/env python
"""MegDet training and evaluation script: detectron2's stock ``train_net.py`` plus MegDet.

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/megdet/<row>.yaml
    python train_net.py --eval-only --config-file <cfg> MODEL.WEIGHTS <checkpoint>

Works with several CPU processes too (gloo), e.g. the quickstart in the README. Several
machines: detectron2's ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT`` on each;
or start it with ``torchrun --nproc-per-node K train_net.py ...`` (nothing is spawned then).
The start-up (config checks, per-process setup, launching) is in megdet_d2/engine/defaults.py.
"""

import os

from detectron2.engine import default_argument_parser

from megdet_d2.engine import MegDetTrainer, default_setup, launch_main, load_config
from megdet_d2.evaluation import MegDetCOCOEvaluator


class Trainer(MegDetTrainer):
    """MegDetTrainer (CGBN-ready, sub-linear memory, MegDet's LR policy) with COCO mmAP/mmAR."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return MegDetCOCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    """The checked config (every start-up check ran once, before launching), then the
    per-process setup: seed, logs, CPU threads, CGBN's process groups."""
    cfg = load_config(args)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_main(main, args)
