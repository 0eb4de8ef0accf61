from .checkpoint import MegDetCheckpointer, remove_stale_temporaries
from .config_file import merge_config, set_after
from .dist_url import resolve_dist_url
from .hooks import (
    NOISE_SCALE_KEYS,
    SAMPLE_STATS_KEYS,
    GradNormHook,
    NoiseScaleHook,
    SampleStatsHook,
    noise_scale_estimates,
)
from .launch import launch, launched_by_torchrun, process_layout
from .layout import bn_size, check_written_for, setup_cgbn_groups
from .list_keys import check_list_keys
from .process_groups import init_process_groups
from .seed import resolve_run_seed
from .supervise import JobFailed
from .threads import set_cpu_threads
from .trainer import MegDetJSONWriter, MegDetTrainer, NamedImageErrors, create_ddp_model
from .validate import (
    check_config,
    check_datasets,
    check_launch_args,
    check_output_dir,
    check_values,
    exit_on_config_error,
)

__all__ = [
    "JobFailed",
    "MegDetCheckpointer",
    "MegDetJSONWriter",
    "MegDetTrainer",
    "NamedImageErrors",
    "GradNormHook",
    "NOISE_SCALE_KEYS",
    "NoiseScaleHook",
    "SAMPLE_STATS_KEYS",
    "SampleStatsHook",
    "bn_size",
    "check_config",
    "check_datasets",
    "check_launch_args",
    "check_list_keys",
    "check_output_dir",
    "check_values",
    "check_written_for",
    "create_ddp_model",
    "exit_on_config_error",
    "init_process_groups",
    "launch",
    "launched_by_torchrun",
    "merge_config",
    "noise_scale_estimates",
    "process_layout",
    "remove_stale_temporaries",
    "set_after",
    "resolve_dist_url",
    "resolve_run_seed",
    "set_cpu_threads",
    "setup_cgbn_groups",
]
