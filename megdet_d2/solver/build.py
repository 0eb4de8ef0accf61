"""Build an LR scheduler by name, and check the solver keys before training starts.

Detectron2 picks its schedulers with an if/elif; here a registry is consulted first and every other
name goes to :func:`detectron2.solver.build_lr_scheduler` unchanged, so a project can call
:func:`build_lr_scheduler` from its own ``Trainer.build_lr_scheduler``.
"""

import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRScheduler
from fvcore.common.registry import Registry

from ..errors import ConfigError
from .batch import check_ims_per_batch
from .presets import check_preset_config

__all__ = [
    "LR_SCHEDULER_REGISTRY",
    "DETECTRON2_LR_SCHEDULERS",
    "build_lr_scheduler",
    "check_solver_config",
]

LR_SCHEDULER_REGISTRY = Registry("LR_SCHEDULER")
LR_SCHEDULER_REGISTRY.__doc__ = """
Registry of LR schedulers selectable by ``SOLVER.LR_SCHEDULER_NAME``.

An entry is registered under its ``__name__`` and called as ``entry(cfg, optimizer)``; it must
return a ``torch.optim.lr_scheduler.LRScheduler`` (typically detectron2's ``LRMultiplier``), e.g.::

    @LR_SCHEDULER_REGISTRY.register()
    def MyLR(cfg, optimizer):
        return LRMultiplier(optimizer, MyParamScheduler(...), max_iter=cfg.SOLVER.MAX_ITER)
"""

# Names handled by detectron2's own build_lr_scheduler.
DETECTRON2_LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR")

# The scheduler that applies the linear scaling rule (defined in lr_scheduler.py).
_MEGDET_LR_SCHEDULER = "LinearScalingWarmupLR"


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """
    The scheduler named ``cfg.SOLVER.LR_SCHEDULER_NAME``: a registered entry, else detectron2's.
    """
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name in LR_SCHEDULER_REGISTRY:
        return LR_SCHEDULER_REGISTRY.get(name)(cfg, optimizer)
    return d2_build_lr_scheduler(cfg, optimizer)


def _fail(key: str, value, fix: str):
    raise ConfigError(f"{key}={value!r} {fix}")


def check_solver_config(cfg, standalone=True) -> None:
    """
    Raise a one-line ``ConfigError`` (key, bad value, fix) for solver settings that would train
    wrongly or crash later. Call it after :func:`apply_schedule_preset`, before freezing.
    ``standalone``: also check the preset's keys and that ``SOLVER.IMS_PER_BATCH`` is positive
    (False: ``check_config`` checked both already, the batch against the processes).
    """
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    known = sorted(set(DETECTRON2_LR_SCHEDULERS) | {n for n, _ in LR_SCHEDULER_REGISTRY})
    if name not in known:
        _fail(
            "SOLVER.LR_SCHEDULER_NAME",
            name,
            f"is not a known LR scheduler; use one of {known} "
            "(or register yours with @LR_SCHEDULER_REGISTRY.register()).",
        )
    if s.BASE_LR <= 0:
        _fail(
            "SOLVER.BASE_LR",
            s.BASE_LR,
            "must be positive; set it to the LR at SOLVER.MEGDET.REFERENCE_BATCH_SIZE "
            "(the paper uses 0.02 for 16 images).",
        )
    if standalone:
        check_preset_config(cfg)

    if name not in ("WarmupMultiStepLR", _MEGDET_LR_SCHEDULER):
        return  # the checks below are about step schedules
    steps = list(s.STEPS)
    if any(b <= a for a, b in zip([0] + steps, steps)):
        _fail(
            "SOLVER.STEPS",
            tuple(steps),
            "must be positive and strictly increasing (the iterations at which the LR drops); "
            "e.g. (60000, 80000).",
        )
    late = [step for step in steps if step >= s.MAX_ITER]
    if late:
        _fail(
            "SOLVER.STEPS",
            tuple(steps),
            f"has step(s) {late} at or after SOLVER.MAX_ITER={s.MAX_ITER}, which would never "
            "apply; give steps below MAX_ITER (or train longer).",
        )
    gammas = list(s.MEGDET.STEP_GAMMAS)
    if gammas and len(gammas) != len(steps):
        _fail(
            "SOLVER.MEGDET.STEP_GAMMAS",
            gammas,
            f"needs one factor per step of SOLVER.STEPS={tuple(steps)} ({len(steps)}); "
            "give that many, or [] to use SOLVER.GAMMA at every step.",
        )
    if name != _MEGDET_LR_SCHEDULER and any(g != s.GAMMA for g in gammas):
        _fail(
            "SOLVER.MEGDET.STEP_GAMMAS",
            gammas,
            f"is ignored by detectron2's {name} (it uses SOLVER.GAMMA={s.GAMMA} at every "
            f"step); set SOLVER.LR_SCHEDULER_NAME {_MEGDET_LR_SCHEDULER!r}.",
        )

    if name != _MEGDET_LR_SCHEDULER:
        return
    if s.REFERENCE_WORLD_SIZE > 0:
        _fail(
            "SOLVER.REFERENCE_WORLD_SIZE",
            s.REFERENCE_WORLD_SIZE,
            f"cannot be combined with {name}, which already scales the LR by "
            "IMS_PER_BATCH / SOLVER.MEGDET.REFERENCE_BATCH_SIZE (scale once); set it to 0.",
        )
    if s.MEGDET.REFERENCE_BATCH_SIZE <= 0:
        _fail(
            "SOLVER.MEGDET.REFERENCE_BATCH_SIZE",
            s.MEGDET.REFERENCE_BATCH_SIZE,
            "must be positive; set it to the mini-batch size SOLVER.BASE_LR was tuned for (16).",
        )
    if standalone:
        check_ims_per_batch(s.IMS_PER_BATCH)
    if s.WARMUP_ITERS >= s.MAX_ITER:
        _fail(
            "SOLVER.WARMUP_ITERS",
            s.WARMUP_ITERS,
            f"must be smaller than SOLVER.MAX_ITER={s.MAX_ITER} (training would end before "
            "reaching k*BASE_LR); lower WARMUP_ITERS or train longer.",
        )
    if s.RESCALE_INTERVAL:
        _fail(
            "SOLVER.RESCALE_INTERVAL",
            s.RESCALE_INTERVAL,
            f"is not supported by {name} (its steps are absolute iterations); set it to False.",
        )
