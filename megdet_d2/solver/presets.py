"""MegDet's training-length presets (paper §4): epochs → iterations for any mini-batch size.

A preset says in *epochs* when the LR decays and when training ends; ``apply_schedule_preset``
turns that into detectron2's iteration keys (``SOLVER.MAX_ITER``, ``SOLVER.STEPS``, ...) for the
configured ``SOLVER.IMS_PER_BATCH``, so "normal" means the same amount of data seen at batch 16
and at batch 256.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from detectron2.data import get_detection_dataset_dicts
from fvcore.common.registry import Registry

from ..config import config_value, set_config_value
from ..errors import ConfigError
from .batch import check_ims_per_batch

__all__ = [
    "SCHEDULE_PRESETS",
    "SchedulePreset",
    "derive_schedule",
    "apply_schedule_preset",
    "check_preset_config",
    "count_training_images",
    "schedule_summary",
]

logger = logging.getLogger(__name__)

SCHEDULE_PRESETS = Registry("SCHEDULE_PRESETS")
SCHEDULE_PRESETS.__doc__ = """
Registry of training-length presets, selected by ``SOLVER.MEGDET.SCHEDULE``.

An entry is registered under its function name and returns a :class:`SchedulePreset`, e.g.::

    @SCHEDULE_PRESETS.register()
    def short():
        return SchedulePreset(decay_epochs=(2,), decay_factors=(0.1,), end_epoch=3)
"""


@dataclass(frozen=True)
class SchedulePreset:
    """
    A step schedule in epochs: multiply the LR by ``decay_factors[i]`` at the start of epoch
    ``decay_epochs[i]`` (0-based epoch index = epochs already seen), stop after ``end_epoch``.
    """

    decay_epochs: Tuple[int, ...]
    decay_factors: Tuple[float, ...]
    end_epoch: int

    def __post_init__(self):
        if len(self.decay_epochs) != len(self.decay_factors):
            raise ValueError(
                f"SchedulePreset: decay_epochs={self.decay_epochs} and "
                f"decay_factors={self.decay_factors} must have the same length"
            )
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)) or any(
            not 0 < e < self.end_epoch for e in self.decay_epochs
        ):
            raise ValueError(
                f"SchedulePreset: decay_epochs={self.decay_epochs} must be strictly increasing "
                f"and inside (0, end_epoch={self.end_epoch})"
            )


@SCHEDULE_PRESETS.register()
def normal() -> SchedulePreset:
    """Paper §4 "normal": x0.1 at epochs 8 and 10, end at epoch 11."""
    return SchedulePreset(decay_epochs=(8, 10), decay_factors=(0.1, 0.1), end_epoch=11)


@SCHEDULE_PRESETS.register()
def long() -> SchedulePreset:
    """Paper §4 "long": x0.1 at epochs 11 and 14, x0.5 at 17 (cumulative 0.005), end at 18."""
    return SchedulePreset(decay_epochs=(11, 14, 17), decay_factors=(0.1, 0.1, 0.5), end_epoch=18)


def registered_preset_names():
    """Sorted names accepted by ``SOLVER.MEGDET.SCHEDULE`` (besides "")."""
    return sorted(name for name, _ in SCHEDULE_PRESETS)


def get_preset(name: str) -> SchedulePreset:
    """The preset registered as ``name``; a one-line ``ConfigError`` listing the names otherwise."""
    if name not in SCHEDULE_PRESETS:
        raise ConfigError(
            f"SOLVER.MEGDET.SCHEDULE={name!r} is not a registered preset; use one of "
            f"{registered_preset_names()} (or register yours with @SCHEDULE_PRESETS.register()), "
            "or '' to use SOLVER.MAX_ITER / STEPS as written."
        )
    return SCHEDULE_PRESETS.get(name)()


def _check_sizes(epoch_size: int, ims_per_batch: int) -> None:
    check_ims_per_batch(ims_per_batch)
    if epoch_size < ims_per_batch:
        raise ConfigError(
            f"SOLVER.MEGDET.EPOCH_SIZE={epoch_size} is smaller than SOLVER.IMS_PER_BATCH="
            f"{ims_per_batch} (an epoch must hold at least one mini-batch); set EPOCH_SIZE to "
            "the number of training images, or 0 to count the registered training set."
        )


def check_preset_config(cfg) -> None:
    """One-line ``ConfigError`` for a preset setting that cannot be derived (no-op without one)."""
    m = cfg.SOLVER.MEGDET
    if not m.SCHEDULE:
        return
    get_preset(m.SCHEDULE)
    _check_sizes(
        m.EPOCH_SIZE if m.EPOCH_SIZE != 0 else cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.IMS_PER_BATCH
    )
    for key in ("EPOCHS", "EVAL_PERIOD_EPOCHS", "CHECKPOINT_PERIOD_EPOCHS"):
        if m[key] < 0:
            raise ConfigError(
                f"SOLVER.MEGDET.{key}={m[key]} is negative; use a number of epochs >= 1, "
                "or 0 for the default (the preset's length / the iteration period as written)."
            )


def derive_schedule(
    name: str, epoch_size: int, ims_per_batch: int, epochs: int = 0
) -> Dict[str, Any]:
    """
    Iterations for preset ``name`` when an epoch of ``epoch_size`` images is read
    ``ims_per_batch`` images at a time (the last, partial batch of an epoch counts as one
    iteration: ``iters_per_epoch = ceil(epoch_size / ims_per_batch)``).

    ``epochs`` > 0 (``SOLVER.MEGDET.EPOCHS``) stretches or shrinks the preset to end after that
    many epochs, its decays at the same fractions of training (e.g. "normal" in 8 epochs:
    decays at 8 * 8/11 and 8 * 10/11 epochs), rounded to iterations.

    Returns:
        dict with ``schedule, epoch_size, iters_per_epoch, max_iter, steps, step_gammas``
        (``steps`` and ``step_gammas`` are lists, aligned).
    """
    preset = get_preset(name)
    _check_sizes(epoch_size, ims_per_batch)
    iters_per_epoch = math.ceil(epoch_size / ims_per_batch)
    scale = epochs / preset.end_epoch if epochs else 1
    max_iter = round(preset.end_epoch * scale * iters_per_epoch)
    steps = [round(e * scale * iters_per_epoch) for e in preset.decay_epochs]
    if steps != sorted(set(steps)) or not 0 < steps[0] or steps[-1] >= max_iter:
        raise ConfigError(
            f"SOLVER.MEGDET.EPOCHS={epochs} leaves preset {name!r} no room for its "
            f"{len(steps)} LR decays at {iters_per_epoch} iterations per epoch; use more epochs"
        )
    return {
        "schedule": name,
        "epoch_size": int(epoch_size),
        "iters_per_epoch": iters_per_epoch,
        "max_iter": max_iter,
        "steps": steps,
        "step_gammas": [float(g) for g in preset.decay_factors],
    }


def count_training_images(cfg) -> int:
    """
    Number of images in ``cfg.DATASETS.TRAIN`` after the filtering detectron2's training loader
    applies (``_train_loader_from_config``), i.e. what one pass of the sampler sees.
    """
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    try:
        return len(dataset)
    except TypeError:
        raise ConfigError(
            f"SOLVER.MEGDET.EPOCH_SIZE=0 but DATASETS.TRAIN={tuple(cfg.DATASETS.TRAIN)} has no "
            "length (iterable dataset); set SOLVER.MEGDET.EPOCH_SIZE to the images per epoch."
        ) from None


# What a preset writes that a user may also have written: key -> how to keep the user's value.
_PROTECTED = {
    "SOLVER.MAX_ITER": "set SOLVER.MEGDET.SCHEDULE '' to use SOLVER.MAX_ITER / STEPS as written",
    "SOLVER.STEPS": "set SOLVER.MEGDET.SCHEDULE '' to use SOLVER.MAX_ITER / STEPS as written",
    "SOLVER.MEGDET.STEP_GAMMAS": "set SOLVER.MEGDET.SCHEDULE '' to use your steps",
    "TEST.EVAL_PERIOD": "set SOLVER.MEGDET.EVAL_PERIOD_EPOCHS 0 to keep TEST.EVAL_PERIOD",
    "SOLVER.CHECKPOINT_PERIOD": (
        "set SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS 0 to keep SOLVER.CHECKPOINT_PERIOD"
    ),
}


def _same(a, b):
    as_list = (list, tuple)
    return (list(a) if isinstance(a, as_list) else a) == (list(b) if isinstance(b, as_list) else b)


def apply_schedule_preset(cfg, explicit=None) -> Dict[str, Any]:
    """
    Write the iterations of preset ``cfg.SOLVER.MEGDET.SCHEDULE`` into the (unfrozen) ``cfg``:
    ``SOLVER.MAX_ITER``, ``SOLVER.STEPS``, ``SOLVER.MEGDET.STEP_GAMMAS``,
    ``SOLVER.MEGDET.ITERS_PER_EPOCH``, and, unless their ``*_PERIOD_EPOCHS`` is 0,
    ``TEST.EVAL_PERIOD`` / ``SOLVER.CHECKPOINT_PERIOD``. A counted training set size is written
    back to ``SOLVER.MEGDET.EPOCH_SIZE``, so the ``config.yaml`` that ``default_setup`` dumps
    reproduces the same numbers (for ``--resume`` / ``--eval-only``) without recounting.

    Every output is a function of the inputs only, so applying it again (e.g. to a re-loaded
    ``config.yaml``) gives the same numbers. Does nothing when SCHEDULE is "".

    Args:
        explicit: ``{key: where}`` of keys the user set deliberately (``train_net.py``: on the
            command line, or in a YAML file inheriting from the one that chose the preset). A
            preset never replaces such a value: a different derived value is a
            ``ConfigError`` naming both keys.

    Returns:
        the derived numbers (see :func:`derive_schedule`, plus ``eval_period`` and
        ``checkpoint_period``), or ``{}`` when no preset is selected.
    """
    m = cfg.SOLVER.MEGDET
    name = m.SCHEDULE
    if not name:
        return {}
    check_preset_config(cfg)  # fail before counting a dataset
    epoch_size = m.EPOCH_SIZE if m.EPOCH_SIZE != 0 else count_training_images(cfg)
    derived = derive_schedule(name, epoch_size, cfg.SOLVER.IMS_PER_BATCH, m.EPOCHS)
    ipe = derived["iters_per_epoch"]
    derived["eval_period"] = m.EVAL_PERIOD_EPOCHS * ipe or cfg.TEST.EVAL_PERIOD
    derived["checkpoint_period"] = m.CHECKPOINT_PERIOD_EPOCHS * ipe or cfg.SOLVER.CHECKPOINT_PERIOD

    updates = {
        "SOLVER.MEGDET.EPOCH_SIZE": derived["epoch_size"],
        "SOLVER.MEGDET.ITERS_PER_EPOCH": ipe,
        "SOLVER.MAX_ITER": derived["max_iter"],
        "SOLVER.STEPS": tuple(derived["steps"]),
        "SOLVER.MEGDET.STEP_GAMMAS": list(derived["step_gammas"]),
        "TEST.EVAL_PERIOD": derived["eval_period"],
        "SOLVER.CHECKPOINT_PERIOD": derived["checkpoint_period"],
    }
    for key, value in updates.items():
        old = config_value(cfg, key)
        if key in (explicit or {}) and key in _PROTECTED and not _same(old, value):
            raise ConfigError(
                f"{key}={old!r} is set {explicit[key]}, but SOLVER.MEGDET.SCHEDULE={name!r} "
                f"derives {key}={value!r} ({epoch_size} images per epoch at SOLVER."
                f"IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} = {ipe} iterations); remove {key} "
                f"to use the preset, or {_PROTECTED[key]}"
            )
    for key, value in updates.items():
        old = config_value(cfg, key)
        if not _same(old, value):
            logger.info(f"Schedule preset {name!r}: {key} {old} -> {value}")
        set_config_value(cfg, key, value)  # raises on a frozen cfg
    logger.info(f"Schedule preset {name!r} derived: {derived}")
    return derived


def schedule_summary(cfg) -> str:
    """One line saying what the applied preset set (for the log, once a logger exists), or ""
    when no preset is selected."""
    s, m = cfg.SOLVER, cfg.SOLVER.MEGDET
    if not m.SCHEDULE:
        return ""
    return (
        f"Schedule preset {m.SCHEDULE!r}: {m.EPOCH_SIZE} images per epoch / "
        f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} = {m.ITERS_PER_EPOCH} iterations per epoch -> "
        f"SOLVER.MAX_ITER {s.MAX_ITER}, SOLVER.STEPS {tuple(s.STEPS)} (factors "
        f"{list(m.STEP_GAMMAS)}), TEST.EVAL_PERIOD {cfg.TEST.EVAL_PERIOD}, "
        f"SOLVER.CHECKPOINT_PERIOD {s.CHECKPOINT_PERIOD}"
    )
