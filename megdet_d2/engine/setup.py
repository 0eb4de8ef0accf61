"""Start-up steps of a MegDet run: config checks before any work, then per-process set-up.

``check_config`` is cheap and pure, so ``train_net.py`` runs it in the launching process and a
bad value ends the job with one line naming the key, before processes are spawned or data and
models are loaded. ``setup_cgbn_groups`` and ``set_cpu_threads`` run in every process.
"""
import contextlib
import logging
import os
import sys

import torch
from detectron2.utils import comm

from ..layers.groups import check_group_size, create_cgbn_groups
from ..solver import check_solver_config

__all__ = ["check_config", "exit_on_config_error", "set_cpu_threads", "setup_cgbn_groups"]

logger = logging.getLogger(__name__)


def check_config(cfg, num_machines, procs_per_machine, training=True):
    """Raise a one-line ``ValueError`` naming the key if ``cfg`` cannot run on this layout."""
    world_size = num_machines * procs_per_machine
    check_group_size(cfg.MODEL.CGBN.GROUP_SIZE, world_size, procs_per_machine)
    if not training:
        return
    ims = cfg.SOLVER.IMS_PER_BATCH
    if ims < world_size or ims % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={ims} must be a positive multiple of the number of processes "
            f"({world_size}); set it to e.g. {world_size * max(1, ims // world_size)}"
        )
    check_solver_config(cfg)


@contextlib.contextmanager
def exit_on_config_error():
    """Turn a config ``ValueError`` into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except ValueError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_cgbn_groups(cfg):
    """Create CGBN's process groups (collective: every process calls it) and log the layout."""
    group_size = cfg.MODEL.CGBN.GROUP_SIZE
    layout = create_cgbn_groups(group_size)
    per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    ranks = len(layout[0])
    logger.info(
        f"CGBN groups (MODEL.CGBN.GROUP_SIZE={group_size}): {layout}; "
        f"BN size = {ranks} processes x {per_process} images per process = {ranks * per_process}"
    )
    return layout


def set_cpu_threads(cfg):
    """Split the machine's cores among the CPU processes of this machine (as torchrun does).

    Every process otherwise starts one thread per core, and N processes oversubscribe N-fold.
    An explicit ``OMP_NUM_THREADS`` wins.
    """
    procs = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
