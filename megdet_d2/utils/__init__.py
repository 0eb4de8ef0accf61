"""Small helpers shared by the package, ``tools/`` and ``experiments/``."""

from .outputs import read_config, read_metrics
from .runs import finished, read_record, run_recorded, run_training_commands, summarize_run
from .seeds import derived_seed

__all__ = [
    "derived_seed",
    "finished",
    "read_config",
    "read_metrics",
    "read_record",
    "run_recorded",
    "run_training_commands",
    "summarize_run",
]
