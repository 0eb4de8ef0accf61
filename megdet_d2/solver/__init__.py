"""MegDet's LR policy: linear scaling + warmup (paper §3.2) and epoch presets (paper §4)."""

from .build import (
    DETECTRON2_LR_SCHEDULERS,
    LR_SCHEDULER_REGISTRY,
    build_lr_scheduler,
    check_solver_config,
)
from .lr_scheduler import (  # registration: "LinearScalingWarmupLR"
    LinearScalingWarmupLR,
    LinearScalingWarmupParamScheduler,
    step_values,
)
from .presets import (  # registration: "normal", "long"
    SCHEDULE_PRESETS,
    SchedulePreset,
    apply_schedule_preset,
    check_preset_config,
    count_training_images,
    derive_schedule,
    schedule_summary,
)

__all__ = [
    "DETECTRON2_LR_SCHEDULERS",
    "LR_SCHEDULER_REGISTRY",
    "SCHEDULE_PRESETS",
    "LinearScalingWarmupLR",
    "LinearScalingWarmupParamScheduler",
    "SchedulePreset",
    "apply_schedule_preset",
    "build_lr_scheduler",
    "check_preset_config",
    "check_solver_config",
    "count_training_images",
    "derive_schedule",
    "schedule_summary",
    "step_values",
]
