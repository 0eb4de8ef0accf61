from .build import build_resumable_train_loader
from .config_datasets import register_config_datasets
from .quickstart import (
    CLASSES,
    TRAIN_NAME,
    VAL_NAME,
    generate_split,
    prepare_quickstart_data,
    register_quickstart_datasets,
)
from .samplers import ResumableBatchSampler, Sample, aspect_ratio_groups, sample_seed
from .seeded_map import SeededMapDataset

__all__ = [
    "CLASSES",
    "ResumableBatchSampler",
    "Sample",
    "SeededMapDataset",
    "TRAIN_NAME",
    "VAL_NAME",
    "aspect_ratio_groups",
    "build_resumable_train_loader",
    "generate_split",
    "prepare_quickstart_data",
    "register_config_datasets",
    "register_quickstart_datasets",
    "sample_seed",
]
