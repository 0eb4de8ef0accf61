"""MegDet model utilities: sub-linear memory (BN-aware activation checkpointing, paper §3.3)."""

from .sublinear import (
    apply_sublinear_memory,
    checkpoint_module,
    is_checkpointed,
    uncheckpoint_module,
)

__all__ = [
    "apply_sublinear_memory",
    "checkpoint_module",
    "is_checkpointed",
    "uncheckpoint_module",
]
