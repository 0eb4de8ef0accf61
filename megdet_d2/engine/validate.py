"""Start-up checks: a bad config ends the job with one line naming the key, before any work.

:func:`check_config` runs every check once, in one order (its docstring); ``load_config``
(``engine/defaults.py``) calls it once per job, in the launching process (under torchrun in
every worker, before the process group is made): a wrong value costs seconds, not the hours
after which a spawned job would discover it. Nothing here needs a process group or builds a
real model (the checkpoint is compared with a ``meta``-device model).
Each check raises a one-line ``ConfigError`` "KEY=value <what is wrong>; <fix>" (or naming the
file); :func:`exit_on_config_error` turns it into ``Config error: ...`` on stderr and exit
status 2, printed once per machine under torchrun (where every process runs the checks).
Faults only a worker can see (an image the data loader cannot decode, a checkpoint from a URL
that loads too little) end that worker the same way; the launcher (``engine/supervise.py``)
then stops the others and prints that line last.
"""

import contextlib
import difflib
import logging
import os
import sys
import tempfile

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from torch import nn

from ..config import check_upgraded, config_value, default_config
from ..data import register_config_datasets, register_quickstart_datasets
from ..data.coco_check import check_coco_dataset
from ..data.quickstart import check_quickstart_config
from ..errors import CONFIG_ERROR_EXIT_CODE, ConfigError, config_error_line
from ..layers import known_norm_names
from ..layers.groups import check_group_size
from ..solver import apply_schedule_preset, check_solver_config
from ..solver.batch import check_ims_per_batch
from .checkpoint import MegDetCheckpointer
from .launch import launched_by_torchrun
from .list_keys import check_list_keys
from .meta_build import build_on, first_line, quiet
from .supervise import report_line

__all__ = [
    "check_config",
    "check_datasets",
    "check_device",
    "check_launch_args",
    "check_list_keys",
    "check_names",
    "check_norms",
    "check_num_classes",
    "check_output_dir",
    "check_values",
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


def check_config(cfg, num_machines, procs_per_machine, training=True, resume=False, explicit=None):
    """Raise a one-line ``ConfigError`` naming the key if ``cfg`` cannot run on this layout.

    Every start-up check, each once, in this order (a check may assume those before it passed):

    1. no deprecated key holds a value; numeric keys in range; ``OUTPUT_DIR`` writable (cheap:
       before any data is read or written);
    2. the datasets: ``MEGDET.COCO_INSTANCES`` and the quickstart's registered (its data made),
       every dataset named registered and its files sound;
    3. training: the schedule preset's keys, then its iterations derived from the counted
       images and written into ``cfg`` (``explicit``: ``{key: where}`` of values the user set
       after choosing it, which it never replaces);
    4. the device, ``MODEL.CGBN.GROUP_SIZE``, component names, norms, number of classes;
    5. the list-valued keys, then the model built on ``meta`` (detectron2's own asserts, as
       one line naming the component);
    6. training: ``SOLVER.IMS_PER_BATCH`` against the processes, the solver and LR schedule;
    7. the checkpoint to load (last: it reads the file).

    Args:
        num_machines, procs_per_machine: the launch (``--num-machines``, ``--num-gpus``, or
            torchrun's ``WORLD_SIZE / LOCAL_WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``).
        training: also check the solver and the training datasets (not for ``--eval-only``).
        resume: ``--resume``; the checkpoint named by ``OUTPUT_DIR/last_checkpoint``, if any,
            is checked instead of ``MODEL.WEIGHTS`` (which is then unused).
    """
    world_size = num_machines * procs_per_machine
    check_upgraded(cfg)
    check_values(cfg, training)
    check_output_dir(cfg)
    check_quickstart_config(cfg)
    register_config_datasets(cfg)  # MEGDET.COCO_INSTANCES: a name clash is an error
    register_quickstart_datasets(cfg, check=False)
    check_datasets(cfg, training)
    if training:
        apply_schedule_preset(cfg, explicit=explicit)  # checks its keys before counting
    check_device(cfg, procs_per_machine)
    check_group_size(cfg.MODEL.CGBN.GROUP_SIZE, world_size, procs_per_machine)
    check_names(cfg, training)
    check_norms(cfg)
    check_num_classes(cfg, training)
    model = check_list_keys(cfg, training)  # builds the model: after names and classes
    if training:
        check_ims_per_batch(cfg.SOLVER.IMS_PER_BATCH, world_size)
        check_solver_config(cfg, standalone=False)  # preset keys and batch: checked above
    check_weights(cfg, resume, model)  # last: it reads the checkpoint


def check_launch_args(num_gpus, num_machines=1, machine_rank=0, dist_url="auto"):
    """``--num-gpus``, ``--num-machines``, ``--machine-rank`` and ``--dist-url`` describe a
    launch (under torchrun the environment does, and ``--num-gpus`` is ignored)."""
    if launched_by_torchrun():
        return
    if num_gpus < 1:
        raise ConfigError(
            f"--num-gpus={num_gpus} must be at least 1: the processes per machine (GPUs, or CPU "
            "processes with MODEL.DEVICE cpu); e.g. --num-gpus 1"
        )
    if num_machines < 1:
        raise ConfigError(f"--num-machines={num_machines} must be at least 1; e.g. 1")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(
            f"--machine-rank={machine_rank} must be in [0, {num_machines - 1}] for "
            f"--num-machines {num_machines} (0 on the machine that hosts --dist-url)"
        )
    if num_machines > 1 and dist_url == "auto":
        raise ConfigError(
            f"--dist-url=auto works on one machine only; with --num-machines {num_machines} "
            "give tcp://HOST0:PORT (machine 0's address), the same on every machine"
        )


# Numeric keys with a lower bound: (key, bound, strict, training only, meaning); the meaning
# goes into the message. Keys of the wrong type are already refused by yacs when merging.
_BOUNDS = (
    ("MEGDET.LOG_PERIOD", 0, True, True, "iterations between metric writes"),
    ("SOLVER.MAX_ITER", 0, True, True, "training iterations"),
    ("SOLVER.CHECKPOINT_PERIOD", 0, True, True, "iterations between checkpoints"),
    ("SOLVER.WARMUP_ITERS", 0, False, True, "warmup iterations; 0 = no warmup"),
    ("SOLVER.WARMUP_FACTOR", 0, False, True, "LR factor at iteration 0 of the warmup"),
    ("SOLVER.GAMMA", 0, True, True, "LR factor at each step"),
    ("SOLVER.MOMENTUM", 0, False, True, "SGD momentum"),
    ("SOLVER.WEIGHT_DECAY", 0, False, True, "L2 weight decay"),
    ("SOLVER.MEGDET.EPOCH_SIZE", 0, False, True, "images per epoch; 0 = count them"),
    ("INPUT.MAX_SIZE_TRAIN", 0, True, True, "longest image side in training, pixels"),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 0, True, True, "anchors sampled per image"),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 0, True, True, "proposals kept before NMS"),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 0, True, True, "proposals kept after NMS"),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 0, True, True, "ROIs sampled per image"),
    ("MEGDET.DIST_TIMEOUT_S", 0, True, False, "seconds a collective waits for the others"),
    ("TEST.EVAL_PERIOD", 0, False, False, "iterations between evaluations; 0 = at the end"),
    ("TEST.DETECTIONS_PER_IMAGE", 0, True, False, "detections kept per image"),
    ("DATALOADER.NUM_WORKERS", 0, False, False, "data loading processes; 0 = in-process"),
    ("INPUT.MIN_SIZE_TEST", 0, False, False, "shortest image side in testing; 0 = no resize"),
    ("INPUT.MAX_SIZE_TEST", 0, True, False, "longest image side in testing, pixels"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 0, True, False, "proposals kept before NMS"),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 0, True, False, "proposals kept after NMS"),
)


def check_values(cfg, training=True):
    """Numeric keys are in range, e.g. ``MEGDET.LOG_PERIOD`` > 0, ``SOLVER.WARMUP_ITERS`` >= 0 (a
    0 or negative value otherwise fails later with a ZeroDivisionError, or trains wrongly)."""
    for key, bound, strict, train_only, meaning in _BOUNDS:
        if train_only and not training:
            continue
        value = config_value(cfg, key)
        if value < bound or (strict and value == bound):
            raise ConfigError(
                f"{key}={value!r} must be {'positive' if strict else 'non-negative'} "
                f"({meaning}); set e.g. the default {config_value(default_config(), key)!r}"
            )
    ema = cfg.MEGDET.NOISE_SCALE_EMA
    if training and cfg.MEGDET.NOISE_SCALE and not 0 <= ema < 1:
        raise ConfigError(
            f"MEGDET.NOISE_SCALE_EMA={ema!r} must be in [0, 1) (weight of the past in the noise "
            "scale's moving averages); set e.g. the default 0.99"
        )
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    if training and (not sizes or any(size <= 0 for size in sizes)):
        raise ConfigError(
            f"INPUT.MIN_SIZE_TRAIN={tuple(sizes)!r} must hold positive sizes (shortest image "
            f"side in training, pixels); set e.g. {tuple(default_config().INPUT.MIN_SIZE_TRAIN)!r}"
        )


def check_device(cfg, procs_per_machine):
    """``MODEL.DEVICE`` is a device, and a CUDA run needs one GPU per process of a machine."""
    device = cfg.MODEL.DEVICE
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"MODEL.DEVICE={device!r} is not a device; use 'cpu' or 'cuda'")
    if kind != "cuda":
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ConfigError(
            f"MODEL.DEVICE={device!r} but no CUDA GPU is visible; set MODEL.DEVICE cpu "
            "(then --num-gpus is the number of CPU processes)"
        )
    if procs_per_machine > gpus:
        raise ConfigError(
            f"--num-gpus={procs_per_machine} processes per machine but only {gpus} GPU(s) are "
            f"visible (MODEL.DEVICE={device!r}); use --num-gpus {gpus} or fewer"
        )


def check_output_dir(cfg):
    """``OUTPUT_DIR`` is a folder this process can create and write to. Nothing is created:
    a temporary file is made and removed in the nearest existing folder."""
    out = cfg.OUTPUT_DIR
    if not out or not _is_local(out):
        return
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"OUTPUT_DIR={out!r} cannot be a folder: {existing!r} is a file; choose another "
            "OUTPUT_DIR"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"OUTPUT_DIR={out!r} is not writable ({existing!r}: {e.strerror}); choose a folder "
            "you can write to, or fix its permissions"
        ) from None


def _registries(cfg):
    """``(key, registry)`` of the component names this model is built from."""
    from detectron2 import modeling as m

    pairs = [("MODEL.META_ARCHITECTURE", m.META_ARCH_REGISTRY),
             ("MODEL.BACKBONE.NAME", m.BACKBONE_REGISTRY),
             ("MODEL.ANCHOR_GENERATOR.NAME", m.ANCHOR_GENERATOR_REGISTRY)]  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "PanopticFPN", "ProposalNetwork"):
        pairs += [("MODEL.PROPOSAL_GENERATOR.NAME", m.PROPOSAL_GENERATOR_REGISTRY),
                  ("MODEL.RPN.HEAD_NAME", m.RPN_HEAD_REGISTRY)]  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "PanopticFPN"):
        pairs += [("MODEL.ROI_HEADS.NAME", m.ROI_HEADS_REGISTRY),
                  ("MODEL.ROI_BOX_HEAD.NAME", m.ROI_BOX_HEAD_REGISTRY)]  # fmt: skip
        if cfg.MODEL.MASK_ON:
            pairs.append(("MODEL.ROI_MASK_HEAD.NAME", m.ROI_MASK_HEAD_REGISTRY))
        if cfg.MODEL.KEYPOINT_ON:
            pairs.append(("MODEL.ROI_KEYPOINT_HEAD.NAME", m.ROI_KEYPOINT_HEAD_REGISTRY))
    return pairs


_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


def check_names(cfg, training=True):
    """Every component name (meta-architecture, backbone, heads, ...) is registered, and the
    training sampler is one detectron2 builds (else a KeyError / ValueError in every worker)."""
    for key, registry in _registries(cfg):
        name = config_value(cfg, key)
        if name not in registry:
            known = sorted(n for n, _ in registry)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(
                f"{key}={name!r} is not registered{hint}; use one of {known}, or register "
                "yours (and import its module) before train_net.py builds the model"
            )
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if training and sampler not in _SAMPLERS:
        raise ConfigError(
            f"DATALOADER.SAMPLER_TRAIN={sampler!r} is not a sampler detectron2 builds; use one "
            f"of {list(_SAMPLERS)}"
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
            raise ConfigError(
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
    its files exist (detectron2 registers ``coco_2017_*`` etc. whether or not they do); a COCO
    dataset's json and images pass :func:`~megdet_d2.data.coco_check.check_coco_dataset`
    (the test sets too, so that a broken one fails now rather than after training)."""
    registered = DatasetCatalog.list()
    for key, name in _dataset_names(cfg, training):
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(
                f"{key} names {name!r}, which is not a registered dataset{hint}; register it "
                "with detectron2.data.datasets.register_coco_instances before training"
            )
        metadata = MetadataCatalog.get(name)
        for meta_key in _DATA_PATH_KEYS:
            path = metadata.get(meta_key, None)
            if isinstance(path, str) and _is_local(path) and not os.path.exists(path):
                raise ConfigError(
                    f"{key} names {name!r}, whose {meta_key} {path!r} does not exist; put the "
                    "data there (detectron2 looks under $DETECTRON2_DATASETS, default "
                    "./datasets) or register the dataset with the right paths"
                )
        summary = _coco_summary(key, name)
        if not summary or summary["annotated_images"]:
            continue
        if key == "DATASETS.TRAIN":
            raise ConfigError(
                f"{key} names {name!r}, whose json_file {metadata.json_file!r} has no image "
                "with a (non-crowd) annotation: nothing to train on (detectron2 drops "
                "unannotated images); add annotations, or train on another dataset"
            )
        if summary["has_annotations"]:  # without the list: a prediction-only test set
            raise ConfigError(
                f"{key} names {name!r}, whose json_file {metadata.json_file!r} has an "
                "'annotations' list but no (non-crowd) annotation: COCO evaluation would "
                "compute nothing (every metric nan); add the annotations, or remove the "
                "'annotations' key to only write predictions"
            )
    _check_proposal_files(cfg, training)


# Checked COCO datasets: (json_file, mtime, size, image_root) -> summary (check_datasets
# checks, check_num_classes reads the class count; a json is read once).
_COCO_CHECKED = {}


def _coco_summary(key, name):
    """The COCO check's summary for dataset ``name``, or None if it is not a local COCO one."""
    metadata = MetadataCatalog.get(name)
    json_file, image_root = metadata.get("json_file", None), metadata.get("image_root", None)
    if metadata.get("evaluator_type", None) != "coco" or not json_file or not image_root:
        return None
    if not (_is_local(json_file) and _is_local(image_root) and os.path.isfile(json_file)):
        return None
    if launched_by_torchrun() and os.environ["LOCAL_RANK"] != "0":
        return None  # local rank 0 checks the machine's files; if they are bad, it exits and
        # torchrun stops this process too (8 processes need not each parse a 450 MB json)
    stat = os.stat(json_file)
    cache_key = (json_file, stat.st_mtime_ns, stat.st_size, image_root)
    if cache_key not in _COCO_CHECKED:
        try:
            _COCO_CHECKED[cache_key] = check_coco_dataset(json_file, image_root)
        except ConfigError as e:
            raise ConfigError(f"{key} names {name!r}: {e}") from None
    return _COCO_CHECKED[cache_key]


def _check_proposal_files(cfg, training):
    if not cfg.MODEL.LOAD_PROPOSALS:
        return
    pairs = [("TEST", cfg.DATASETS.TEST, cfg.DATASETS.PROPOSAL_FILES_TEST)]
    if training:
        pairs.insert(0, ("TRAIN", cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN))
    for split, names, files in pairs:
        if len(files) != len(names):
            raise ConfigError(
                f"DATASETS.PROPOSAL_FILES_{split} has {len(files)} file(s) for "
                f"{len(names)} dataset(s) in DATASETS.{split} (MODEL.LOAD_PROPOSALS True); give "
                "one per dataset"
            )
        for path in files:
            if _is_local(path) and not os.path.isfile(path):
                raise ConfigError(
                    f"DATASETS.PROPOSAL_FILES_{split} names {path!r}, which does not exist; "
                    "give the precomputed proposals, or set MODEL.LOAD_PROPOSALS False"
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
    evaluation. The class count is the dataset's ``thing_classes`` when registered with them
    (builtin COCO, the quickstart), else that of its checked COCO json's ``categories``.
    """
    key = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    num_classes = config_value(cfg, key)
    if num_classes <= 0:
        raise ConfigError(f"{key}={num_classes} must be positive (object classes)")
    for dataset_key, name in _dataset_names(cfg, training):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        count = len(classes) if classes is not None else None
        if count is None:
            summary = _coco_summary(dataset_key, name)
            count = summary["categories"] if summary else None
        if count is not None and count != num_classes:
            raise ConfigError(
                f"{key}={num_classes} but dataset {name!r} has {count} classes; set "
                f"{key} {count} (or use datasets with {num_classes} classes)"
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
            raise ConfigError(
                f"{key} names {name!r}, which does not exist in OUTPUT_DIR; restore that file, "
                "or remove last_checkpoint to start from MODEL.WEIGHTS"
            )
        return key, path
    return "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS


def check_weights(cfg, resume=False, model=None):
    """The local checkpoint the run will load exists, can be read, and fits the model: shapes
    (``MEGDET.STRICT_SHAPES``) and at least half of the model's tensors found in it
    (``MEGDET.ALLOW_PARTIAL_WEIGHTS``). URLs and detectron2:// paths are left to loading.

    The checkpoint is loaded into a model built on the ``meta`` device (no memory, no
    initialisation cost) with the same checkpointer and name conversions as the real load, so
    that a mismatch costs seconds in the launcher rather than a traceback from every worker.
    ``model``: that model if the caller has it (``check_list_keys`` builds it); None: built here.
    """
    key, path = _checkpoint_to_load(cfg, resume)
    if not path or not _is_local(path):
        return
    if not os.path.isfile(path):
        raise ConfigError(
            f"{key}={path!r} is not a file; give an existing checkpoint, a URL or "
            "detectron2:// path, or '' to start from scratch"
        )
    if model is None:
        model = _meta_model(cfg)
    checkpointer = MegDetCheckpointer(
        model if model is not None else nn.Module(),  # then: only read the file
        strict_shapes=cfg.MEGDET.STRICT_SHAPES,
        allow_partial=cfg.MEGDET.ALLOW_PARTIAL_WEIGHTS or model is None,
    )
    with quiet():
        try:
            checkpointer.load(path, checkpointables=[])
        except ConfigError as e:
            raise ConfigError(f"{key}={path!r}: {e}") from None
        except Exception as e:  # torch.load / pickle / a state dict that is not one
            raise ConfigError(
                f"{key}={path!r} cannot be read as a checkpoint ({type(e).__name__}: "
                f"{first_line(e)}); give a complete checkpoint file (.pth, or .pkl from "
                "detectron2's model zoo)"
            ) from None


def _meta_model(cfg):
    """``build_model(cfg)`` with every tensor on the ``meta`` device, or None if this model
    cannot be built there (the check is then left to the real load in each worker)."""
    try:
        return build_on(cfg, "meta")
    except Exception:  # any builder: an early check must not block a model it cannot build
        logging.getLogger(__name__).debug("cannot build the model on meta", exc_info=True)
        return None


@contextlib.contextmanager
def exit_on_config_error(catch=ConfigError, every_process=True):
    """Turn a config error into ``Config error: <one line>`` on stderr and exit status 2, with
    no traceback.

    Args:
        catch: the exceptions meaning a config fault: ``ConfigError`` only, so that a genuine
            bug (any other exception) keeps its traceback and is never dressed as a config
            error.
        every_process: every process of the machine runs this same block (the launcher's
            checks run in each torchrun worker): only local rank 0 prints, the others exit
            with the same status silently. False: the failing process prints (a fault only it
            saw, e.g. an image it could not read).
    """
    try:
        yield
    except catch as e:
        if not (every_process and launched_by_torchrun()) or os.environ["LOCAL_RANK"] == "0":
            report_line(f"Config error: {config_error_line(e)}")
        sys.exit(CONFIG_ERROR_EXIT_CODE)
