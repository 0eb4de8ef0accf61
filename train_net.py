#!/usr/bin/env python
"""MegDet training and evaluation script: detectron2's stock ``train_net.py`` plus MegDet.

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/megdet/<row>.yaml
    python train_net.py --eval-only --config-file <cfg> MODEL.WEIGHTS <checkpoint>

Works with several CPU processes too (gloo), e.g. the quickstart in the README. Several
machines: detectron2's ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT`` on each;
or start it with ``torchrun --nproc-per-node K train_net.py ...`` (nothing is spawned then).
"""

import logging
import os
import sys
from datetime import timedelta

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import megdet_d2
from megdet_d2 import ConfigError, add_megdet_config, apply_schedule_preset
from megdet_d2.data import register_config_datasets, register_quickstart_datasets
from megdet_d2.engine import (
    JobFailed,
    MegDetCheckpointer,
    MegDetTrainer,
    check_config,
    check_datasets,
    check_launch_args,
    check_output_dir,
    check_values,
    check_written_for,
    exit_on_config_error,
    launch,
    merge_config,
    process_layout,
    resolve_dist_url,
    resolve_run_seed,
    set_after,
    set_cpu_threads,
    setup_cgbn_groups,
)
from megdet_d2.errors import CONFIG_ERROR_EXIT_CODE
from megdet_d2.evaluation import MegDetCOCOEvaluator
from megdet_d2.modeling import apply_sublinear_memory
from megdet_d2.solver import schedule_summary


class Trainer(MegDetTrainer):
    """DefaultTrainer (CPU-safe model wrapping) with MegDet's evaluator and LR policy."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MEGDET.SUBLINEAR_MEMORY:  # paper §3.3: recompute backbone activations
            logging.getLogger("megdet_d2").info(
                f"Sub-linear memory: checkpointing {len(apply_sublinear_memory(model))} modules"
            )
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return MegDetCOCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return megdet_d2.build_lr_scheduler(cfg, optimizer)


def load_config(args):
    """Defaults + MegDet keys + YAML + command line; preset iterations derived; checked.
    Every fault is a one-line ``ConfigError`` (see ``megdet_d2/engine/validate.py``)."""
    training = not args.eval_only
    check_launch_args(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    cfg = get_cfg()
    add_megdet_config(cfg)
    sources = merge_config(cfg, args.config_file, args.opts)  # where each key was set
    check_values(cfg, training)  # the cheap checks before any data is read
    check_output_dir(cfg)
    register_config_datasets(cfg)  # MEGDET.COCO_INSTANCES
    register_quickstart_datasets(cfg)
    check_datasets(cfg, training)  # before a preset counts the images
    if training:  # a value set after choosing the preset is never replaced silently
        apply_schedule_preset(cfg, explicit=set_after(sources, "SOLVER.MEGDET.SCHEDULE"))
    # the launch's layout: --num-machines x --num-gpus, or torchrun's environment
    num_machines, procs_per_machine = process_layout(args.num_gpus, args.num_machines)
    check_config(cfg, num_machines, procs_per_machine, training=training, resume=args.resume)
    cfg.freeze()
    return cfg


def setup(args, cfg=None):
    """``cfg``: the config the launcher already loaded and checked, so that the checks, the
    preset's image count and the checkpoint read are not repeated in every worker; None (e.g.
    ``main(args)`` called directly): load it here."""
    if cfg is None:
        cfg = load_config(args)
    else:
        register_config_datasets(cfg)  # the dataset catalog is per process
        register_quickstart_datasets(cfg)
    resolve_run_seed(cfg, args.resume)  # SEED -1: one seed for the run, reused by --resume
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="megdet_d2")
    if not args.eval_only and schedule_summary(cfg):
        logging.getLogger("megdet_d2").info(schedule_summary(cfg))
    return cfg


def main(args, cfg=None):
    # A fault only this process can see (an image it cannot read): its one line, status 2.
    with exit_on_config_error(ConfigError, every_process=False):
        return _main(args, cfg)


def _main(args, cfg):
    cfg = setup(args, cfg)
    set_cpu_threads(cfg)
    setup_cgbn_groups(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MegDetCheckpointer(
            model,
            save_dir=cfg.OUTPUT_DIR,
            strict_shapes=cfg.MEGDET.STRICT_SHAPES,
            allow_partial=cfg.MEGDET.ALLOW_PARTIAL_WEIGHTS,
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    check_written_for(cfg)  # logs images per process and BN size; warns on another layout
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    with exit_on_config_error():
        cfg = load_config(args)  # fail fast, with one line, before any process is spawned
        # detectron2's default URL on one machine -> a free port; a taken explicit port -> error
        dist_url = resolve_dist_url(
            args.dist_url, args.num_gpus, args.num_machines, args.machine_rank
        )
    try:
        launch(  # spawn and supervise, or no spawning under torchrun
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=dist_url,
            args=(args, cfg),
            timeout=timedelta(seconds=cfg.MEGDET.DIST_TIMEOUT_S),  # a dead peer fails the job
        )
    except JobFailed as e:
        if e.exit_code == CONFIG_ERROR_EXIT_CODE:  # the worker printed its one config-error line
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        sys.exit(f"Job failed: {e}")  # the workers printed their tracebacks; the cause in one line
