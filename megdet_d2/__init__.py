"""megdet_d2: MegDet (Peng et al., CVPR 2018) for Detectron2.

The public API is re-exported here. Importing the package also registers MegDet's pieces into
Detectron2 (imports marked "registration"); it never changes detectron2's default config.
"""

from .config import add_megdet_config, upgrade_config
from .errors import ConfigError

# registration: norm name "CGBN" in NORM_REGISTRY, consulted by detectron2's get_norm
from .layers import (
    CGBN,
    NORM_REGISTRY,
    convert_to_cgbn,
    create_cgbn_groups,
    get_cgbn_group,
)

# sub-linear memory (paper §3.3): BN/CGBN-aware activation checkpointing (no registration)
from .modeling import apply_sublinear_memory

# registration: scheduler "LinearScalingWarmupLR", presets "normal" / "long"
from .solver import (
    LR_SCHEDULER_REGISTRY,
    SCHEDULE_PRESETS,
    apply_schedule_preset,
    build_lr_scheduler,
    check_solver_config,
)

__version__ = "0.1.0"

__all__ = [
    "CGBN",
    "ConfigError",
    "NORM_REGISTRY",
    "convert_to_cgbn",
    "create_cgbn_groups",
    "get_cgbn_group",
    "LR_SCHEDULER_REGISTRY",
    "SCHEDULE_PRESETS",
    "add_megdet_config",
    "apply_sublinear_memory",
    "apply_schedule_preset",
    "build_lr_scheduler",
    "check_solver_config",
    "upgrade_config",
]
