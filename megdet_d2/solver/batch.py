"""The one check of ``SOLVER.IMS_PER_BATCH``, shared by the start-up checks, the presets, the
LR scheduler and the launch-layout report."""

from ..errors import ConfigError

__all__ = ["check_ims_per_batch"]


def check_ims_per_batch(ims_per_batch, world_size=1):
    """``SOLVER.IMS_PER_BATCH`` (all processes together) must be a positive multiple of the
    number of processes; a one-line ``ConfigError`` otherwise."""
    if ims_per_batch < world_size or ims_per_batch % world_size != 0:
        suggestion = world_size * max(1, ims_per_batch // world_size)
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={ims_per_batch} must be a positive multiple of the number of "
            f"processes ({world_size}); set it to e.g. {suggestion}, the total number of images "
            "per iteration"
        )
