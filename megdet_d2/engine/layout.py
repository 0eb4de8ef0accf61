"""The launch's CGBN layout: the process groups (``setup_cgbn_groups``, every process), the BN
size it gives (``bn_size``), and how it compares with the launch a config was written for
(``log_layout``, Table 3's rows; ``check_written_for`` also checks the batch first)."""

import logging
from datetime import timedelta

from detectron2.utils import comm

from ..layers.groups import create_cgbn_groups, group_ranks_count
from ..solver.batch import check_ims_per_batch

__all__ = [
    "bn_size",
    "check_written_for",
    "log_layout",
    "setup_cgbn_groups",
]

logger = logging.getLogger(__name__)


def setup_cgbn_groups(cfg):
    """Create CGBN's process groups (collective: every process calls it), with the run's
    ``MEGDET.DIST_TIMEOUT_S``, and log the layout."""
    group_size = cfg.MODEL.CGBN.GROUP_SIZE
    layout = create_cgbn_groups(group_size, timeout=timedelta(seconds=cfg.MEGDET.DIST_TIMEOUT_S))
    per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    ranks = len(layout[0])
    logger.info(
        f"CGBN groups (MODEL.CGBN.GROUP_SIZE={group_size}): {layout}; "
        f"BN size = {ranks} processes x {per_process} images per process = {ranks * per_process}"
    )
    return layout


# Backbone norms with batch statistics -> how many processes share them ("group": CGBN's).
_BATCH_STAT_NORMS = {"BN": "process", "CGBN": "group", "SyncBN": "world", "nnSyncBN": "world",
                     "naiveSyncBN": "world", "naiveSyncBN_N": "world"}  # fmt: skip


def bn_size(cfg, world_size, procs_per_machine):
    """Images per BN statistic of the backbone (Table 3's "BN size"; 0 = no batch statistics)."""
    share = _BATCH_STAT_NORMS.get(cfg.MODEL.RESNETS.NORM)
    if share is None:
        return 0
    if share == "process":
        procs = 1
    elif share == "world":
        procs = world_size
    else:  # MODEL.CGBN.GROUP_SIZE
        procs = group_ranks_count(cfg.MODEL.CGBN.GROUP_SIZE, world_size, procs_per_machine)
    return procs * (cfg.SOLVER.IMS_PER_BATCH // world_size)


def check_written_for(cfg, world_size=None, procs_per_machine=None):
    """:func:`log_layout`, after checking that ``SOLVER.IMS_PER_BATCH`` fits the processes (for
    a config that did not pass the start-up checks)."""
    check_ims_per_batch(cfg.SOLVER.IMS_PER_BATCH, world_size or comm.get_world_size())
    return log_layout(cfg, world_size, procs_per_machine)


def log_layout(cfg, world_size=None, procs_per_machine=None):
    """Log images per process and BN size; warn where they differ from ``MEGDET.WRITTEN_FOR``.

    A Table 3 row is (batch, BN size, GPUs): launched on other GPU counts, the same file gives
    other images per process and BN sizes, i.e. another row. Returns the actual numbers.
    """
    world_size = world_size or comm.get_world_size()
    procs_per_machine = procs_per_machine or comm.get_local_size()
    batch = cfg.SOLVER.IMS_PER_BATCH
    actual = {"NUM_GPUS": world_size, "BN_SIZE": bn_size(cfg, world_size, procs_per_machine)}
    wanted = cfg.MEGDET.WRITTEN_FOR
    logger.info(
        f"Mini-batch {batch} = {world_size} processes x {batch // world_size} images per process;"
        f" BN size {actual['BN_SIZE']} (MODEL.RESNETS.NORM={cfg.MODEL.RESNETS.NORM!r}); "
        f"config written for NUM_GPUS={wanted.NUM_GPUS or 'any'}, BN_SIZE="
        f"{wanted.BN_SIZE if wanted.BN_SIZE >= 0 else 'any'}"
    )
    unset = {"NUM_GPUS": 0, "BN_SIZE": -1}
    for key, value in actual.items():
        if wanted[key] != unset[key] and wanted[key] != value:
            logger.warning(
                f"MEGDET.WRITTEN_FOR.{key}={wanted[key]} but this launch gives {value}: this is "
                f"not the experiment the config describes (images per process "
                f"{batch // world_size}, BN size {actual['BN_SIZE']})"
            )
    return actual
