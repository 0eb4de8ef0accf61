"""The user's own COCO-format datasets, named in the config instead of registered in Python.

``MEGDET.COCO_INSTANCES`` lists ``[name, json file, image folder]`` triples;
:func:`register_config_datasets` registers each with detectron2's ``register_coco_instances``
in every process (the dataset catalog is per process), so ``DATASETS.TRAIN`` / ``TEST`` can name
them like any builtin dataset. The start-up checks then read each json once (paths, ids,
images, class count vs ``NUM_CLASSES``: ``megdet_d2/data/coco_check.py``).
"""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import ConfigError

__all__ = ["register_config_datasets"]

_KEY = "MEGDET.COCO_INSTANCES"
_EXAMPLE = '[["my_train", "data/train.json", "data/images"]]'


def _entries(cfg):
    """The triples of ``MEGDET.COCO_INSTANCES``, checked for shape and names."""
    entries, names = [], set()
    for i, entry in enumerate(cfg.MEGDET.COCO_INSTANCES):
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise ConfigError(
                f"{_KEY}[{i}]={entry!r} is not a [name, json file, image folder] triple of "
                f"non-empty strings; write e.g. {_KEY} {_EXAMPLE}"
            )
        name = entry[0]
        if name in names:
            raise ConfigError(f"{_KEY} names {name!r} twice; give each dataset its own name")
        names.add(name)
        entries.append(tuple(entry))
    return entries


def register_config_datasets(cfg):
    """Register every ``MEGDET.COCO_INSTANCES`` entry (idempotent); returns their names.

    A name already registered by someone else (a builtin such as ``coco_2017_train``, or another
    json) is an error naming it; re-registering the same json is a no-op.
    """
    entries = _entries(cfg)
    for name, json_file, image_root in entries:
        json_file, image_root = os.path.expanduser(json_file), os.path.expanduser(image_root)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file", None) == json_file:
                continue
            raise ConfigError(
                f"{_KEY}: the name {name!r} is already registered (a builtin dataset or another "
                "json); choose another name"
            )
        register_coco_instances(name, {}, json_file, image_root)
    return [name for name, _, _ in entries]
