from .build import build_resumable_train_loader
from .config_datasets import register_config_datasets
from .quickstart import (
    CLASSES,
    DIFFICULTY_DEFAULTS,
    TRAIN_NAME,
    VAL_NAME,
    generate_split,
    prepare_quickstart_data,
    register_quickstart_datasets,
)
from .samplers import ResumableBatchSampler, Sample, aspect_ratio_groups, sample_seed
from .seeded_map import SeededMapDataset
from .shapes import SHAPES

__all__ = [
    "CLASSES",
    "DIFFICULTY_DEFAULTS",
    "ResumableBatchSampler",
    "SHAPES",
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
