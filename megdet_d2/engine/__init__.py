from .checkpoint import MegDetCheckpointer
from .dist_url import resolve_dist_url
from .hooks import SAMPLE_STATS_KEYS, SampleStatsHook
from .launch import launch, launched_by_torchrun, process_layout
from .process_groups import init_process_groups
from .setup import bn_size, check_written_for, set_cpu_threads, setup_cgbn_groups
from .supervise import JobFailed
from .trainer import MegDetTrainer, create_ddp_model
from .validate import check_config, check_datasets, exit_on_config_error

__all__ = [
    "JobFailed",
    "MegDetCheckpointer",
    "MegDetTrainer",
    "SAMPLE_STATS_KEYS",
    "SampleStatsHook",
    "bn_size",
    "check_config",
    "check_datasets",
    "check_written_for",
    "create_ddp_model",
    "exit_on_config_error",
    "init_process_groups",
    "launch",
    "launched_by_torchrun",
    "process_layout",
    "resolve_dist_url",
    "set_cpu_threads",
    "setup_cgbn_groups",
]
