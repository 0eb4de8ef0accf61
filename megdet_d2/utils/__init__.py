"""Small helpers shared by the package, ``tools/`` and ``experiments/``."""

from .outputs import read_config, read_metrics
from .runs import run_training_commands
from .seeds import derived_seed

__all__ = ["derived_seed", "read_config", "read_metrics", "run_training_commands"]
