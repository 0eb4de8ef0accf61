from .setup import check_config, exit_on_config_error, set_cpu_threads, setup_cgbn_groups
from .trainer import MegDetTrainer, create_ddp_model

__all__ = [
    "MegDetTrainer",
    "check_config",
    "create_ddp_model",
    "exit_on_config_error",
    "set_cpu_threads",
    "setup_cgbn_groups",
]
