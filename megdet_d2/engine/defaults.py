"""A MegDet run's start-up, as ``detectron2/engine/defaults.py`` is detectron2's.

* :func:`load_config`: detectron2's defaults, MegDet's keys, the YAML file and the command line,
  then every start-up check once, in :func:`~megdet_d2.engine.validate.check_config`'s order
  (the schedule preset is applied among them). Run once per job, in the launching process.
* :func:`default_setup`: the per-process part, in every worker.
* :func:`launch_main`: what ``train_net.py`` does under ``__main__``: config errors before
  anything is spawned, the dist URL, :func:`~megdet_d2.engine.launch.launch`, the exit status.
"""

import sys
from datetime import timedelta

from detectron2.config import get_cfg
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_megdet_config
from ..data import register_config_datasets, register_quickstart_datasets
from ..solver import schedule_summary
from .config_file import merge_config, set_after
from .dist_url import resolve_dist_url
from .launch import launch, process_layout
from .layout import log_layout, setup_cgbn_groups
from .seed import resolve_run_seed
from .supervise import JobFailed, reports_to_launcher
from .threads import set_cpu_threads
from .trainer import quiet_console_tracebacks
from .validate import check_config, check_launch_args, exit_on_config_error

__all__ = ["default_setup", "launch_main", "load_config"]

_launched_with = None  # the config launch_main checked and launched this process with


def load_config(args):
    """The frozen config of the run ``args`` (detectron2's ``default_argument_parser``)
    describes, checked; a fault is a one-line ``ConfigError``.

    In a process :func:`launch_main` started, this returns the config it checked before
    launching: the checks, the preset's image count and the checkpoint read run once."""
    if _launched_with is not None:
        return _launched_with
    check_launch_args(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    cfg = get_cfg()
    add_megdet_config(cfg)
    sources = merge_config(cfg, args.config_file, args.opts)  # where each key was set
    # the launch's layout: --num-machines x --num-gpus, or torchrun's environment
    num_machines, procs_per_machine = process_layout(args.num_gpus, args.num_machines)
    check_config(
        cfg,
        num_machines,
        procs_per_machine,
        training=not args.eval_only,
        resume=args.resume,
        explicit=set_after(sources, "SOLVER.MEGDET.SCHEDULE"),  # never replaced by the preset
    )
    cfg.freeze()
    return cfg


def default_setup(cfg, args):
    """Every process, once the process group exists: its dataset catalog (per process), one
    seed for the run (``SEED -1``; reused by ``--resume``), detectron2's ``default_setup``
    (output folder, ``config.yaml``, logs, seeding), MegDet's logger and schedule summary, CPU
    threads, CGBN's process groups, and the layout line (images per process, BN size)."""
    register_config_datasets(cfg)
    register_quickstart_datasets(cfg, check=False)  # checked by load_config
    resolve_run_seed(cfg, args.resume)
    d2_defaults.default_setup(cfg, args)
    if reports_to_launcher():
        quiet_console_tracebacks()  # the launcher prints the root cause's
    logger = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="megdet_d2")
    summary = "" if args.eval_only else schedule_summary(cfg)
    if summary:
        logger.info(summary)
    set_cpu_threads(cfg)
    setup_cgbn_groups(cfg)
    if not args.eval_only:
        log_layout(cfg)  # warns if launched on another layout than MEGDET.WRITTEN_FOR


def launch_main(main, args):
    """Run ``main(args)`` in every process of the launch ``args`` describes, then exit.

    The config is loaded and checked first, here (one line and status 2 on a fault, nothing
    spawned); a taken ``--dist-url`` port is refused the same way. A failed job prints the root
    cause last: a config error as is (status 2), else its traceback and ``Job failed: ...``."""
    with exit_on_config_error():
        cfg = load_config(args)
        dist_url = resolve_dist_url(
            args.dist_url, args.num_gpus, args.num_machines, args.machine_rank
        )  # detectron2's default URL on one machine -> a free port
    try:
        with exit_on_config_error(every_process=False):  # a fault a single process finds
            return launch(  # spawn and supervise, or nothing spawned under torchrun
                _main_with_config,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=dist_url,
                args=(main, args, cfg),
                timeout=timedelta(seconds=cfg.MEGDET.DIST_TIMEOUT_S),  # a dead peer fails it
            )
    except JobFailed as e:
        print(f"{e.traceback}{e.last_line}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code if e.exit_code > 0 else 1)


def _main_with_config(main, args, cfg):
    """``main(args)``, whose ``load_config(args)`` returns ``cfg``."""
    global _launched_with
    _launched_with = cfg
    return main(args)
