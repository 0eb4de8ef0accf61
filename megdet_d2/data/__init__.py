from .quickstart import (
    CLASSES,
    TRAIN_NAME,
    VAL_NAME,
    generate_split,
    prepare_quickstart_data,
    register_quickstart_datasets,
)
from .samplers import ResumableSampler, find_resumable_sampler

__all__ = [
    "CLASSES",
    "ResumableSampler",
    "TRAIN_NAME",
    "VAL_NAME",
    "find_resumable_sampler",
    "generate_split",
    "prepare_quickstart_data",
    "register_quickstart_datasets",
]
