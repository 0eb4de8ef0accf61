"""Small helpers shared by the package, ``tools/`` and ``experiments/``."""

from .outputs import read_config, read_metrics
from .seeds import derived_seed

__all__ = ["derived_seed", "read_config", "read_metrics"]
