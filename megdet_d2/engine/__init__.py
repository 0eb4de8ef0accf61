"""What a training script needs (``train_net.py``); every other piece is importable from its
module, e.g. ``megdet_d2.engine.validate.check_config``."""

from .checkpoint import MegDetCheckpointer
from .defaults import default_setup, launch_main, load_config
from .launch import launch
from .layout import setup_cgbn_groups
from .supervise import JobFailed
from .trainer import MegDetTrainer, create_ddp_model

__all__ = [
    "JobFailed",
    "MegDetCheckpointer",
    "MegDetTrainer",
    "create_ddp_model",
    "default_setup",
    "launch",
    "launch_main",
    "load_config",
    "setup_cgbn_groups",
]
