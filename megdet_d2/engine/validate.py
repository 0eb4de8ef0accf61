"""Start-up checks: a bad config ends the job with one line naming the key, before any work.

Everything here is cheap and needs no process group, so ``train_net.py`` runs it in the
launching process (or, under torchrun, in every worker before the process group is made):
a wrong value costs seconds, not the hours after which a spawned job would discover it.
Each check raises a one-line ``ValueError`` "KEY=value <what is wrong>; <fix>";
:func:`exit_on_config_error` turns it into ``Config error: ...`` on stderr and exit status 2.
"""

import contextlib
import difflib
import os
import sys

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..layers import known_norm_names
from ..layers.groups import check_group_size
from ..solver import check_solver_config

__all__ = [
    "check_config",
    "check_datasets",
    "check_device",
    "check_norms",
    "check_weights",
    "exit_on_config_error",
]

# Dataset metadata keys that name files or folders the loaders read (COCO, LVIS, VOC,
# Cityscapes, panoptic COCO as detectron2's builtin.py registers them).
_DATA_PATH_KEYS = (
    "json_file",
    "image_root",
    "dirname",
    "image_dir",
    "gt_dir",
    "panoptic_json",
    "panoptic_root",
    "sem_seg_root",
)


def check_config(cfg, num_machines, procs_per_machine, training=True, resume=False):
    """Raise a one-line ``ValueError`` naming the key if ``cfg`` cannot run on this layout.

    Args:
        num_machines, procs_per_machine: the launch (``--num-machines``, ``--num-gpus``, or
            torchrun's ``WORLD_SIZE / LOCAL_WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``).
        training: also check the solver and the training datasets (not for ``--eval-only``).
        resume: ``--resume``; ``MODEL.WEIGHTS`` is then unused if ``OUTPUT_DIR`` holds a
            checkpoint, so it is not checked.
    """
    world_size = num_machines * procs_per_machine
    check_device(cfg, procs_per_machine)
    check_group_size(cfg.MODEL.CGBN.GROUP_SIZE, world_size, procs_per_machine)
    check_norms(cfg)
    check_datasets(cfg, training)
    if not (resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        check_weights(cfg)
    if not training:
        return
    ims = cfg.SOLVER.IMS_PER_BATCH
    if ims < world_size or ims % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={ims} must be a positive multiple of the number of processes "
            f"({world_size}); set it to e.g. {world_size * max(1, ims // world_size)}"
        )
    check_solver_config(cfg)


def check_device(cfg, procs_per_machine):
    """``MODEL.DEVICE`` must exist, and a CUDA run needs one GPU per process of a machine."""
    device = cfg.MODEL.DEVICE
    if not device.startswith("cuda"):
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ValueError(
            f"MODEL.DEVICE={device!r} but no CUDA GPU is visible; set MODEL.DEVICE cpu "
            "(then --num-gpus is the number of CPU processes)"
        )
    if procs_per_machine > gpus:
        raise ValueError(
            f"--num-gpus={procs_per_machine} processes per machine but only {gpus} GPU(s) are "
            f"visible (MODEL.DEVICE={device!r}); use --num-gpus {gpus} or fewer"
        )


def _norm_keys(node, prefix=""):
    """``(dotted key, value)`` of every string ``NORM`` key in the config tree."""
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _norm_keys(value, f"{prefix}{key}.")
        elif key == "NORM" and isinstance(value, str):
            yield f"{prefix}{key}", value


def check_norms(cfg):
    """Every ``*.NORM`` key is "" (no norm) or a name ``get_norm`` resolves."""
    known = known_norm_names()
    for key, value in _norm_keys(cfg):
        if value and value not in known:
            raise ValueError(
                f"{key}={value!r} is not a known norm; use one of {known} or '' (no norm), or "
                "register yours with @megdet_d2.NORM_REGISTRY.register()"
            )


def _is_local(path):
    return "://" not in path


def check_datasets(cfg, training=True):
    """Every dataset named in ``DATASETS.TEST`` (and ``TRAIN`` when training) is registered and
    its files exist (detectron2 registers ``coco_2017_*`` etc. whether or not they do)."""
    names = [("DATASETS.TEST", n) for n in cfg.DATASETS.TEST]
    if training:
        names = [("DATASETS.TRAIN", n) for n in cfg.DATASETS.TRAIN] + names
    registered = DatasetCatalog.list()
    for key, name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" (did you mean {close}?)" if close else ""
            raise ValueError(
                f"{key} names {name!r}, which is not a registered dataset{hint}; register it "
                "with detectron2.data.datasets.register_coco_instances before training"
            )
        metadata = MetadataCatalog.get(name)
        for meta_key in _DATA_PATH_KEYS:
            path = metadata.get(meta_key, None)
            if isinstance(path, str) and _is_local(path) and not os.path.exists(path):
                raise ValueError(
                    f"{key} names {name!r}, whose {meta_key} {path!r} does not exist; put the "
                    "data there (detectron2 looks under $DETECTRON2_DATASETS, default "
                    "./datasets) or register the dataset with the right paths"
                )


def check_weights(cfg):
    """A local ``MODEL.WEIGHTS`` file must exist (URLs and detectron2:// are left to loading)."""
    path = cfg.MODEL.WEIGHTS
    if path and _is_local(path) and not os.path.isfile(path):
        raise ValueError(
            f"MODEL.WEIGHTS={path!r} is not a file; give an existing checkpoint, a URL or "
            "detectron2:// path, or '' to start from scratch"
        )


@contextlib.contextmanager
def exit_on_config_error():
    """Turn a config ``ValueError`` into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except ValueError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
