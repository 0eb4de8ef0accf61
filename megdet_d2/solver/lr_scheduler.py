"""MegDet's LR policy (paper §3.2): linear scaling rule plus a warmup from r to k·r.

``SOLVER.BASE_LR`` is the rate r at ``SOLVER.MEGDET.REFERENCE_BATCH_SIZE`` images per iteration;
with k = ``IMS_PER_BATCH / REFERENCE_BATCH_SIZE`` training runs at k·r, reached by a constant
increment per iteration over ``SOLVER.WARMUP_ITERS``. Composed from detectron2's / fvcore's
schedulers (``WarmupParamScheduler`` over a k-scaled ``MultiStepParamScheduler``) and applied as
a multiplier of every param group's initial LR (``LRMultiplier``), so per-group factors such as
``SOLVER.BIAS_LR_FACTOR`` are preserved.
"""

import logging
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler, ParamScheduler

from .build import LR_SCHEDULER_REGISTRY, check_solver_config

__all__ = [
    "LinearScalingWarmupParamScheduler",
    "LinearScalingWarmupLR",
    "step_values",
]

logger = logging.getLogger(__name__)


class _ScaledParamScheduler(ParamScheduler):
    """``scale * scheduler(where)``: the linear scaling rule applied to any schedule."""

    def __init__(self, scheduler: ParamScheduler, scale: float):
        self._scheduler = scheduler
        self._scale = scale

    def __call__(self, where: float) -> float:
        return self._scale * self._scheduler(where)


class LinearScalingWarmupParamScheduler(WarmupParamScheduler):
    """
    LR multiplier ``scale * scheduler(where)`` (linear scaling rule, ``scale`` = k) behind
    detectron2's ``WarmupParamScheduler``:

    * k > 1 (MegDet): warmup factor 1/k, i.e. from ``scheduler(0)`` (the reference rate r) up
      to the value after warmup (k·r) by a constant increment; ``warmup_factor`` is not used.
    * k <= 1 (nothing to warm up from): detectron2's warmup, from ``warmup_factor * k``.

    Usable from a LazyConfig as ``lr_multiplier``, e.g.::

        L(LinearScalingWarmupParamScheduler)(
            scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01],
                                                 milestones=[3672, 4590], num_updates=5049),
            scale=256 / 16, warmup_length=500 / 5049)
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        scale: float,
        warmup_length: float,
        warmup_factor: float = 0.001,
        warmup_method: str = "linear",
    ):
        """
        Args:
            scheduler: the schedule after warmup, relative to the reference rate (1.0 = r).
            scale: k, the ratio of the mini-batch size to the reference mini-batch size.
            warmup_length: fraction (in [0, 1]) of training spent warming up,
                e.g. ``WARMUP_ITERS / MAX_ITER``.
            warmup_factor: start of the warmup relative to k·r, used only when k <= 1.
            warmup_method: "linear" (constant increment) or "constant" (stay at the start).
        """
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if not 0.0 <= warmup_length <= 1.0:
            raise ValueError(f"warmup_length must be in [0, 1], got {warmup_length}")
        self.scale = scale
        super().__init__(
            _ScaledParamScheduler(scheduler, scale),
            warmup_factor=1.0 / scale if scale > 1 else warmup_factor,
            warmup_length=warmup_length,
            warmup_method=warmup_method,
        )


def step_values(gammas: Sequence[float]) -> List[float]:
    """Multipliers of a step schedule with one factor per step: ``[1, g0, g0*g1, ...]``."""
    values = [1.0]
    for g in gammas:
        values.append(values[-1] * g)
    return values


@LR_SCHEDULER_REGISTRY.register()
class LinearScalingWarmupLR(LRMultiplier):
    """
    ``SOLVER.LR_SCHEDULER_NAME: "LinearScalingWarmupLR"``: an ``LRMultiplier`` driven by
    :class:`LinearScalingWarmupParamScheduler`, with the step schedule of ``SOLVER.STEPS`` and
    ``SOLVER.MEGDET.STEP_GAMMAS`` (one factor per step; empty = ``SOLVER.GAMMA`` at every step).

    As with every ``LRMultiplier``, the LR of iteration t is set by the t-th ``step()`` (the
    constructor makes the 0th), so the trainer's "optimizer.step(); scheduler.step()" uses
    k·r at iteration ``WARMUP_ITERS`` and r at iteration 0.
    """

    @configurable
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: ParamScheduler,
        max_iter: int,
        last_iter: int = -1,
    ):
        super().__init__(optimizer, multiplier, max_iter, last_iter)

    @classmethod
    def from_config(cls, cfg, optimizer):
        check_solver_config(cfg)
        s = cfg.SOLVER
        gammas = list(s.MEGDET.STEP_GAMMAS) or [s.GAMMA] * len(s.STEPS)
        steps = [(step, g) for step, g in zip(s.STEPS, gammas) if step < s.MAX_ITER]
        if len(steps) != len(s.STEPS):
            logger.warning(
                f"SOLVER.STEPS={tuple(s.STEPS)} has steps >= SOLVER.MAX_ITER={s.MAX_ITER}; "
                "they are ignored."
            )
        step_schedule = MultiStepParamScheduler(
            values=step_values([g for _, g in steps]),
            milestones=[step for step, _ in steps],
            num_updates=s.MAX_ITER,
        )
        multiplier = LinearScalingWarmupParamScheduler(
            step_schedule,
            scale=s.IMS_PER_BATCH / s.MEGDET.REFERENCE_BATCH_SIZE,
            warmup_length=min(s.WARMUP_ITERS / s.MAX_ITER, 1.0),
            warmup_factor=s.WARMUP_FACTOR,
            warmup_method=s.WARMUP_METHOD,
        )
        return {"optimizer": optimizer, "multiplier": multiplier, "max_iter": s.MAX_ITER}
