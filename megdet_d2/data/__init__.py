from .quickstart import (
    CLASSES,
    TRAIN_NAME,
    VAL_NAME,
    generate_split,
    prepare_quickstart_data,
    register_quickstart_datasets,
)

__all__ = [
    "CLASSES",
    "TRAIN_NAME",
    "VAL_NAME",
    "generate_split",
    "prepare_quickstart_data",
    "register_quickstart_datasets",
]
