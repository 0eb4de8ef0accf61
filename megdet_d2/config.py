"""MegDet config keys. `add_megdet_config(cfg)` is the only way they enter a config.

Call it on a fresh ``get_cfg()`` before merging a YAML file; nothing here touches detectron2's
global default config at import time. Three nodes, by what a key is about:

* ``MODEL.CGBN.*``: the CGBN layer (its process groups);
* ``SOLVER.MEGDET.*``: the LR policy and the schedule presets;
* ``MEGDET.*``: everything else of a run (sub-linear memory, the launch a config was written
  for, sample statistics, reliability, logging, the quickstart and config-declared data).

Keys of the previous layout (``LOG_PERIOD``, ``MODEL.MEGDET.SUBLINEAR_MEMORY``,
``DATASETS.QUICKSTART.*``) still load for one release: :func:`upgrade_config` moves them to
their new names with a ``FutureWarning`` (``train_net.py`` calls it after merging).
"""

import functools
import warnings

import torch
from detectron2.config import CfgNode as CN

from .errors import ConfigError

__all__ = [
    "DEPRECATED_KEYS",
    "add_megdet_config",
    "check_upgraded",
    "config_value",
    "default_config",
    "set_config_value",
    "upgrade_config",
]

_QUICKSTART_KEYS = ("ROOT", "NUM_TRAIN", "NUM_VAL", "IMAGE_SIZE", "ASPECT_RATIOS", "SEED")
# old name -> new name; the old names are removed in the next release.
DEPRECATED_KEYS = {
    "LOG_PERIOD": "MEGDET.LOG_PERIOD",
    "MODEL.MEGDET.SUBLINEAR_MEMORY": "MEGDET.SUBLINEAR_MEMORY",
    **{f"DATASETS.QUICKSTART.{k}": f"MEGDET.QUICKSTART.{k}" for k in _QUICKSTART_KEYS},
}


def add_megdet_config(cfg):
    """Add the MegDet keys (CGBN groups, linear-scaling LR policy, quickstart data) to ``cfg``."""
    _C = cfg

    # Detectron2 defaults to "cuda"; run out of the box on CPU-only machines. An explicit
    # "cuda" in a YAML file or on the command line still wins (and is validated at start-up).
    _C.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    # ---------------------------------------------------------------------------------------
    # CGBN: cross-GPU batch normalisation (paper §3.3). Select it with NORM: "CGBN" on any
    # detectron2 norm key (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM, ...).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.CGBN = CN()
    # Processes whose batch statistics are reduced together:
    #   0  = the processes of one machine (the paper's setting; detectron2's per-machine group),
    #   k  = consecutive blocks of k ranks (k must divide the world size; may span machines),
    #   -1 = all ranks.
    # BN size (images per statistic) = group size x images per process.
    _C.MODEL.CGBN.GROUP_SIZE = 0

    # ---------------------------------------------------------------------------------------
    # LR policy (paper §3.2, §4), used with SOLVER.LR_SCHEDULER_NAME: "LinearScalingWarmupLR".
    # ---------------------------------------------------------------------------------------
    _C.SOLVER.MEGDET = CN()
    # SOLVER.BASE_LR is the rate r at this mini-batch size; the peak rate is
    # k * r with k = SOLVER.IMS_PER_BATCH / REFERENCE_BATCH_SIZE (linear scaling rule).
    _C.SOLVER.MEGDET.REFERENCE_BATCH_SIZE = 16
    # Schedule preset: "normal" (x0.1 at epochs 8 and 10, end at 11), "long" (x0.1 at 11 and 14,
    # x0.5 at 17, end at 18), or "" to use SOLVER.MAX_ITER / STEPS / GAMMA as written.
    _C.SOLVER.MEGDET.SCHEDULE = ""
    # Under a preset: train this many epochs, the preset's decays at the same fractions of
    # training (e.g. "normal" in 8 epochs decays at 8 * 8/11 and 8 * 10/11); 0 = as the preset.
    _C.SOLVER.MEGDET.EPOCHS = 0
    # Training images per epoch for presets; 0 = count the registered training set (after
    # detectron2's filtering of empty images). apply_schedule_preset writes the count back here.
    _C.SOLVER.MEGDET.EPOCH_SIZE = 0
    # Under a preset: evaluate every this many epochs (0 = keep TEST.EVAL_PERIOD as written).
    _C.SOLVER.MEGDET.EVAL_PERIOD_EPOCHS = 1
    # Under a preset: checkpoint every this many epochs (0 = keep SOLVER.CHECKPOINT_PERIOD).
    _C.SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS = 1
    # LR factor applied at each of SOLVER.STEPS (same length), cumulatively; [] = SOLVER.GAMMA at
    # every step. Filled by a preset ("long" needs [0.1, 0.1, 0.5]); used by LinearScalingWarmupLR.
    _C.SOLVER.MEGDET.STEP_GAMMAS = []
    # Derived, not an input: iterations per epoch, ceil(EPOCH_SIZE / IMS_PER_BATCH), written by
    # apply_schedule_preset (0 = no preset applied); lets hooks convert iterations to epochs.
    _C.SOLVER.MEGDET.ITERS_PER_EPOCH = 0

    # ---------------------------------------------------------------------------------------
    # Paper experiments (§3.3, Tables 1-3): sub-linear memory, the launch a config was
    # written for, and the positive / negative sample statistics.
    # ---------------------------------------------------------------------------------------
    # MEGDET.*: everything of a run that is neither the CGBN layer nor the LR policy.
    _C.MEGDET = CN()
    # Sub-linear memory (§3.3, Chen et al. 2016): checkpoint the activations of every trainable
    # ResNet block (and of the FPN's normalised convs) and recompute them in backward: R50-FPN
    # keeps ~0.5x the activations at 1.0-1.8x the time (CPU, H200; docs/benchmarks.md),
    # so a GPU holds more images (larger BN sizes per GPU). Recomputation reuses the first
    # forward's BN/CGBN statistics: no second running-statistics update and no extra
    # collective. See megdet_d2/modeling/sublinear.py.
    _C.MEGDET.SUBLINEAR_MEMORY = False
    # The launch a config was written for (a row of Table 3). At start-up train_net.py logs
    # images per process and BN size and warns when the actual launch differs.
    _C.MEGDET.WRITTEN_FOR = CN()
    # Processes (GPUs) in all, e.g. 64 = 8 machines x 8 GPUs; 0 = not stated.
    _C.MEGDET.WRITTEN_FOR.NUM_GPUS = 0
    # Images per BN statistic (Table 3's "BN size"); 0 = no batch statistics (FrozenBN, the
    # "16-base" row), -1 = not stated.
    _C.MEGDET.WRITTEN_FOR.BN_SIZE = -1
    # Table 1: a hook sums the RPN / ROI-head sampler's positive and negative samples over the
    # whole mini-batch (all processes, one all_reduce per iteration) into metrics.json as
    # "sample_stats/*"; tools/sample_stats_table.py turns them into Table 1.
    _C.MEGDET.SAMPLE_STATS = True

    # ---------------------------------------------------------------------------------------
    # Reliability and logging of long multi-process runs (train_net.py, MegDetTrainer).
    # ---------------------------------------------------------------------------------------
    # Iterations between writes of metrics.json / TensorBoard / the console (detectron2's
    # DefaultTrainer hard-codes 20; LazyConfig calls this train.log_period).
    _C.MEGDET.LOG_PERIOD = 20
    # Also log the global L2 norm of the gradients (after DDP's all-reduce, before the optimizer
    # step) as "grad_norm" every iteration, to diagnose an unstable run next to "lr" and the
    # losses (GradNormHook; one norm per parameter per iteration, no collective).
    _C.MEGDET.LOG_GRAD_NORM = False
    # Measure the gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018):
    # about the largest mini-batch that still trains nearly linearly faster (docs/lr_policy.md).
    # A DDP comm hook takes each process's gradient before the all-reduce (batch IMS_PER_BATCH /
    # processes) and the all-reduced one (batch IMS_PER_BATCH): no extra backward pass, one
    # all_reduce of 3 values per log period; "noise_scale/{b_simple,S,G2}" in metrics.json, and
    # at the end one line comparing the mini-batch with B_simple. Needs 2 or more processes.
    _C.MEGDET.NOISE_SCALE = False
    # Weight of the past in the per-iteration moving averages of the local and the all-reduced
    # squared gradient norms (B_simple = EMA(S) / EMA(|G|^2)): 0.99 averages over ~100
    # iterations; in [0, 1), 0 = each log period's last iteration alone (very noisy).
    _C.MEGDET.NOISE_SCALE_EMA = 0.99
    # Seconds a process waits in a collective (all_reduce, broadcast, barrier) for the others
    # before the job fails with an error, instead of hanging when a process died, froze or
    # diverged. Given to every process group of the run: the world group, detectron2's
    # per-machine group and CGBN's groups (torch's default for each: 1800). Keep it above the
    # longest step one process takes while the others wait (a checkpoint save, the COCO
    # evaluation rank 0 runs on the gathered predictions, a first NCCL connection).
    _C.MEGDET.DIST_TIMEOUT_S = 1800
    # Loading MODEL.WEIGHTS or a --resume checkpoint whose tensor shapes do not fit the model
    # is an error naming the keys (detectron2 only warns and leaves those tensors untrained).
    # False: skip them with detectron2's warning, e.g. to fine-tune with another NUM_CLASSES.
    _C.MEGDET.STRICT_SHAPES = True
    # Loading a checkpoint that provides under half of the model's tensors (names that match
    # nothing, e.g. a torchvision ResNet, or another architecture) is an error: detectron2 would
    # log the missing keys and train from scratch. True: load what matches and train the rest
    # from scratch, for fine-tuning from a partial checkpoint on purpose.
    _C.MEGDET.ALLOW_PARTIAL_WEIGHTS = False

    # ---------------------------------------------------------------------------------------
    # Your own COCO-format data without code: [name, json file, image folder] triples, each
    # registered with detectron2's register_coco_instances in every process, so that
    # DATASETS.TRAIN / TEST can name them. E.g. in YAML, under MEGDET:
    #   COCO_INSTANCES: [["my_train", "data/train.json", "data/images"],
    #                    ["my_val", "data/val.json", "data/images"]]
    # Checked at start-up like every dataset (files, ids, images, classes vs NUM_CLASSES).
    # ---------------------------------------------------------------------------------------
    _C.MEGDET.COCO_INSTANCES = []

    # ---------------------------------------------------------------------------------------
    # Built-in quickstart data: coloured shapes on small canvases, generated deterministically
    # to COCO json + PNG files and registered as "megdet_shapes_train" / "megdet_shapes_val".
    # ---------------------------------------------------------------------------------------
    _C.MEGDET.QUICKSTART = CN()
    # Folder the data is written to ("" = $DETECTRON2_DATASETS/megdet_shapes, default
    # ./datasets/megdet_shapes). Generated once; later runs reuse the files.
    _C.MEGDET.QUICKSTART.ROOT = ""
    # Images generated for "megdet_shapes_train".
    _C.MEGDET.QUICKSTART.NUM_TRAIN = 512
    # Images generated for "megdet_shapes_val".
    _C.MEGDET.QUICKSTART.NUM_VAL = 64
    # Canvas side in pixels (the longer side when the canvas is not square).
    _C.MEGDET.QUICKSTART.IMAGE_SIZE = 128
    # Width / height of each image, drawn per image from this list: [1.0] = square canvases
    # (the default data); e.g. [0.75, 1.5] gives portrait and landscape images, as COCO has,
    # so that DATALOADER.ASPECT_RATIO_GROUPING has two groups to keep apart.
    _C.MEGDET.QUICKSTART.ASPECT_RATIOS = [1.0]
    # Seed of the generator: the same seed (and sizes) gives the same images and boxes.
    _C.MEGDET.QUICKSTART.SEED = 0
    # Difficulty (the defaults draw the quickstart data byte for byte; a harder variant, for
    # detection accuracy well below saturation: configs/experiments/shapes_hard_R18_FPN.yaml).
    # Shape classes, the first NUM_CLASSES of square, circle, triangle, diamond, cross, ring
    # (a circle with a hole), hexagon, triangle_down (1-8); MODEL.ROI_HEADS.NUM_CLASSES must
    # match.
    _C.MEGDET.QUICKSTART.NUM_CLASSES = 3
    # Objects per image, drawn uniformly from 1..MAX_OBJECTS.
    _C.MEGDET.QUICKSTART.MAX_OBJECTS = 4
    # Object side, drawn uniformly in [low, high] x the shorter image side.
    _C.MEGDET.QUICKSTART.OBJECT_SIZE = [0.125, 0.375]
    # An object is placed only where its box has IoU below this with every earlier one (up to
    # 10 tries, else it is left out); higher: more, and more overlapping, objects.
    _C.MEGDET.QUICKSTART.MAX_OVERLAP = 0.1
    # Unannotated distractors per image, drawn under the objects: lines, outlines of boxes and
    # ellipses, small blobs, in any colour.
    _C.MEGDET.QUICKSTART.CLUTTER = 0
    # Standard deviation of Gaussian pixel noise added to every image (0-255 units; 0 = none).
    _C.MEGDET.QUICKSTART.NOISE = 0.0

    # ---------------------------------------------------------------------------------------
    # Deprecated names of the previous layout (DEPRECATED_KEYS), moved by upgrade_config.
    # ---------------------------------------------------------------------------------------
    _C.LOG_PERIOD = _C.MEGDET.LOG_PERIOD
    _C.MODEL.MEGDET = CN()
    _C.MODEL.MEGDET.SUBLINEAR_MEMORY = _C.MEGDET.SUBLINEAR_MEMORY
    # only the keys that had the old name (the difficulty keys never did)
    _C.DATASETS.QUICKSTART = CN({k: _C.MEGDET.QUICKSTART[k] for k in _QUICKSTART_KEYS})
    return cfg


def config_value(cfg, key):
    """The value of dotted ``key`` (e.g. ``"SOLVER.MAX_ITER"``) in ``cfg``."""
    return functools.reduce(getattr, key.split("."), cfg)


def set_config_value(cfg, key, value):
    """Set dotted ``key`` in ``cfg`` (raises on a frozen config, as ``setattr`` does)."""
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, cfg), leaf, value)


@functools.lru_cache(maxsize=1)
def default_config():
    """detectron2's defaults + MegDet's keys, made once; read it, never change it."""
    from detectron2.config import get_cfg

    return add_megdet_config(get_cfg())


def upgrade_config(cfg):
    """Move values set under a deprecated name (:data:`DEPRECATED_KEYS`) to the new name, with a
    ``FutureWarning`` each; the old key is reset. Call after merging YAML files / overrides
    (``train_net.py`` does). Both names set to different values is a ``ConfigError``.

    Returns:
        the ``{old: new}`` names that were moved.
    """
    defaults, moved = default_config(), {}
    for old, new in DEPRECATED_KEYS.items():
        value, default = config_value(cfg, old), config_value(defaults, old)
        if value == default:
            continue
        current = config_value(cfg, new)
        if current != config_value(defaults, new) and current != value:
            raise ConfigError(
                f"{old}={value!r} (deprecated) and {new}={current!r} are both set; keep only "
                f"{new}"
            )
        set_config_value(cfg, new, value)
        set_config_value(cfg, old, default)
        moved[old] = new
        warnings.warn(
            f"config key {old} is deprecated and will be removed in the next release; use {new} "
            f"(its value {value!r} was used for {new})",
            FutureWarning,
            stacklevel=2,
        )
    return moved


def check_upgraded(cfg):
    """A ``ConfigError`` if a deprecated name still holds a value (``upgrade_config`` was not
    called after merging): it would otherwise be ignored silently."""
    defaults = default_config()
    for old, new in DEPRECATED_KEYS.items():
        if config_value(cfg, old) != config_value(defaults, old):
            raise ConfigError(
                f"{old} is deprecated and not read any more; use {new}, or call "
                "megdet_d2.upgrade_config(cfg) after merging your config"
            )
