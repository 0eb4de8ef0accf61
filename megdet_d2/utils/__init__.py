"""Small helpers shared by the package, ``tools/`` and ``experiments/``."""

from .outputs import read_config, read_metrics

__all__ = ["read_config", "read_metrics"]
