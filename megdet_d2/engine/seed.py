"""One seed per run, also when the config says ``SEED: -1`` (random), so ``--resume`` is exact.

Detectron2 draws a new random seed in every launch for ``SEED < 0`` (the paper configs inherit
-1), so a resumed run would shuffle and augment differently from the run it continues.
:func:`resolve_run_seed` replaces a negative ``SEED`` by a concrete one before
``default_setup``: drawn by rank 0 for a new run, or, under ``--resume``, the one the
interrupted run recorded in ``OUTPUT_DIR/config.yaml``; every process gets rank 0's value and
``config.yaml`` records it. ``SEED >= 0`` is left as written.
"""

import logging
import os

from detectron2.utils import comm

from ..utils import read_config

__all__ = ["resolve_run_seed"]

logger = logging.getLogger(__name__)


def _choose(cfg, resume):
    if resume:
        recorded = read_config(cfg.OUTPUT_DIR).get("SEED", -1)
        if isinstance(recorded, int) and recorded >= 0:
            return recorded, f"the interrupted run's, from {cfg.OUTPUT_DIR}/config.yaml"
    return int.from_bytes(os.urandom(4), "little") >> 1, "drawn for this run"


def resolve_run_seed(cfg, resume):
    """Set ``cfg.SEED`` (when negative) to this run's seed, the same in every process; call in
    every process before ``default_setup``. Returns the seed."""
    if cfg.SEED >= 0:
        return cfg.SEED
    choice = _choose(cfg, resume) if comm.is_main_process() else None
    seed, how = comm.all_gather(choice)[0] if comm.get_world_size() > 1 else choice
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SEED = seed
    if frozen:
        cfg.freeze()
    logger.info(f"SEED=-1 -> {seed} ({how}; --resume reuses it, config.yaml records it)")
    return seed
