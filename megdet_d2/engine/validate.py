"""Start-up checks: a bad config ends the job with one line naming the key, before any work.

Nothing here needs a process group or builds a real model (the checkpoint is compared with a
``meta``-device model), so ``train_net.py`` runs it once in the launching process (or, under
torchrun, in every worker before the process group is made): a wrong value costs seconds, not
the hours after which a spawned job would discover it.
Each check raises a one-line ``ValueError`` "KEY=value <what is wrong>; <fix>";
:func:`exit_on_config_error` turns it into ``Config error: ...`` on stderr and exit status 2.
"""

import contextlib
import difflib
import functools
import logging
import os
import pickle
import sys
import warnings

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from ..layers import known_norm_names
from ..layers.groups import check_group_size
from ..solver import check_solver_config
from .checkpoint import MegDetCheckpointer

__all__ = [
    "check_config",
    "check_datasets",
    "check_device",
    "check_norms",
    "check_num_classes",
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
        resume: ``--resume``; the checkpoint named by ``OUTPUT_DIR/last_checkpoint``, if any,
            is checked instead of ``MODEL.WEIGHTS`` (which is then unused).
    """
    world_size = num_machines * procs_per_machine
    check_device(cfg, procs_per_machine)
    check_group_size(cfg.MODEL.CGBN.GROUP_SIZE, world_size, procs_per_machine)
    check_norms(cfg)
    check_datasets(cfg, training)
    check_num_classes(cfg, training)
    if training:
        ims = cfg.SOLVER.IMS_PER_BATCH
        if ims < world_size or ims % world_size != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={ims} must be a positive multiple of the number of "
                f"processes ({world_size}); set it to e.g. {world_size * max(1, ims // world_size)}"
            )
        check_solver_config(cfg)
    check_weights(cfg, resume)  # last: it reads the checkpoint


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


def _dataset_names(cfg, training):
    """``(key, name)`` of every dataset the run reads: ``DATASETS.TRAIN`` (when training), then
    ``DATASETS.TEST``."""
    names = [("DATASETS.TRAIN", name) for name in cfg.DATASETS.TRAIN] if training else []
    return names + [("DATASETS.TEST", name) for name in cfg.DATASETS.TEST]


def check_datasets(cfg, training=True):
    """Every dataset named in ``DATASETS.TEST`` (and ``TRAIN`` when training) is registered and
    its files exist (detectron2 registers ``coco_2017_*`` etc. whether or not they do)."""
    registered = DatasetCatalog.list()
    for key, name in _dataset_names(cfg, training):
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


# The key holding the number of object classes, per meta-architecture (as detectron2 builds them).
_NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "PanopticFPN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
}


def check_num_classes(cfg, training=True):
    """The model's number of classes equals that of every dataset it trains or tests on.

    A mismatch otherwise fails late: fewer classes than the dataset is a target-out-of-range
    error in the first loss, more can be an assertion in COCOEvaluator after the first
    evaluation. Datasets whose ``thing_classes`` are only known after loading them (plain
    ``register_coco_instances``) are not checked.
    """
    key = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    num_classes = functools.reduce(getattr, key.split("."), cfg)
    for _, name in _dataset_names(cfg, training):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"{key}={num_classes} but dataset {name!r} has {len(classes)} classes; set "
                f"{key} {len(classes)} (or use datasets with {num_classes} classes)"
            )


def _checkpoint_to_load(cfg, resume):
    """``(key, path)`` of the checkpoint the run loads, as ``resume_or_load`` picks it."""
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        key = f"OUTPUT_DIR/last_checkpoint ({last})"
        path = os.path.join(cfg.OUTPUT_DIR, name)
        if not os.path.isfile(path):
            raise ValueError(
                f"{key} names {name!r}, which does not exist in OUTPUT_DIR; restore that file, "
                "or remove last_checkpoint to start from MODEL.WEIGHTS"
            )
        return key, path
    return "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS


def check_weights(cfg, resume=False):
    """The local checkpoint the run will load exists and fits the model (URLs and
    detectron2:// paths are left to loading).

    The shapes are compared on a model built on the ``meta`` device (no memory, no
    initialisation cost) with the same checkpointer and name conversions as the real load, so
    that a mismatch costs seconds in the launcher rather than a traceback from every worker.
    """
    key, path = _checkpoint_to_load(cfg, resume)
    if not path or not _is_local(path):
        return
    if not os.path.isfile(path):
        raise ValueError(
            f"{key}={path!r} is not a file; give an existing checkpoint, a URL or "
            "detectron2:// path, or '' to start from scratch"
        )
    if not cfg.MEGDET.STRICT_SHAPES:
        return
    model = _meta_model(cfg)
    if model is None:
        return
    with _quiet():
        try:
            MegDetCheckpointer(model, strict_shapes=True).load(path, checkpointables=[])
        except ValueError as e:
            raise ValueError(f"{key}={path!r}: {e}") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"{key}={path!r} cannot be read as a checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); give a complete checkpoint file"
            ) from None


def _meta_model(cfg):
    """``build_model(cfg)`` with every tensor on the ``meta`` device, or None if this model
    cannot be built there (the check is then left to the real load in each worker)."""
    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    try:
        with _quiet(), torch.device("meta"):
            return build_model(meta_cfg)
    except Exception:  # any builder: an early check must not block a model it cannot build
        logging.getLogger(__name__).debug("cannot build the model on meta", exc_info=True)
        return None


@contextlib.contextmanager
def _quiet():
    """Silence the loaders' logs and warnings (the launcher has no log file yet)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def exit_on_config_error():
    """Turn a config ``ValueError`` into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except ValueError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
