"""Start-up checks of list-valued keys: lengths and names that must fit the model.

Detectron2 checks these with bare ``assert``s while building the model, or not at all until the
first forward pass of every worker: a ``MODEL.PIXEL_MEAN`` of two numbers builds a stem with two
input channels, ``MODEL.RPN.IN_FEATURES`` naming a feature the backbone does not produce is a
``KeyError`` in the first iteration, a ``SOLVER.STEPS`` value past ``MAX_ITER`` is silently never
applied. Here each list is compared with what it must fit (the input format's channels, the
feature maps the backbone produces, the matcher's thresholds, the schedule) in the launcher,
before any process is spawned, and a fault is one ``ConfigError`` line naming the key.

Whatever the explicit checks do not cover (a custom head's own lists) is caught by building the
model once, on the ``meta`` device (on the CPU when a component cannot be built there): a
failure is reported with its exception and the source line that raised it.
"""

import collections.abc
import logging
import os
import traceback

from detectron2.modeling import build_backbone

from ..errors import ConfigError
from .meta_build import build_on, first_line

__all__ = ["INPUT_CHANNELS", "RESNET_FEATURES", "check_list_keys"]

# Channels of an image read as detectron2's read_image(format=INPUT.FORMAT) reads it.
INPUT_CHANNELS = {
    "BGR": 3,
    "RGB": 3,
    "YUV-BT.601": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "L": 1,
    "I": 1,
    "F": 1,
    "1": 1,
    "P": 1,
    "LA": 2,
    "RGBA": 4,
    "CMYK": 4,
}
# The features detectron2's ResNet can output (MODEL.RESNETS.OUT_FEATURES).
RESNET_FEATURES = ("stem", "res2", "res3", "res4", "res5")
_RCNN = ("GeneralizedRCNN", "PanopticFPN")
_MATCHER_LABELS = (-1, 0, 1)  # ignore, negative, positive
_CROP_TYPES = ("relative_range", "relative", "absolute", "absolute_range")


def _show(value):
    """A config list as the user wrote it in YAML (lists, not tuples)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _fail(key, value, problem, fix):
    raise ConfigError(f"{key}={_show(value)} {problem}; {fix}")


def _is_list(value):
    return isinstance(value, collections.abc.Sequence) and not isinstance(value, str)


def check_list_keys(cfg, training=True):
    """Raise a one-line ``ConfigError`` naming the key if a list-valued key does not fit.

    Call after the component names are known to be registered (``check_names``): the backbone
    is built on the ``meta`` device to learn the features it produces. Returns the whole model,
    built on ``meta`` (or the CPU), for the checkpoint check.
    """
    _check_pixel_stats(cfg)
    _check_datasets_given(cfg, training)
    if training:
        _check_input_lists(cfg)
    _check_resnet_lists(cfg)
    features = _backbone_features(cfg)
    _check_in_features(cfg, features)
    _check_anchors(cfg)
    _check_matchers(cfg)
    _check_box_heads(cfg)
    _check_test_lists(cfg)
    return _check_model_builds(cfg)


def _check_pixel_stats(cfg):
    mean, std, fmt = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD), cfg.INPUT.FORMAT
    channels = INPUT_CHANNELS.get(fmt)  # None: a format detectron2 may read; not compared
    for key, values in (("MODEL.PIXEL_MEAN", mean), ("MODEL.PIXEL_STD", std)):
        if channels is not None and len(values) != channels:
            _fail(
                key,
                values,
                f"has {len(values)} value(s) but INPUT.FORMAT={fmt!r} images have "
                f"{channels} channel(s)",
                f"give {channels} value(s), one per channel (the "
                "stem's input channels are len(MODEL.PIXEL_MEAN))",
            )
    if len(mean) != len(std):
        _fail(
            "MODEL.PIXEL_STD",
            std,
            f"has {len(std)} value(s) but MODEL.PIXEL_MEAN has {len(mean)}",
            "give one mean and one std per input channel",
        )
    if any(not s > 0 for s in std):
        _fail(
            "MODEL.PIXEL_STD",
            std,
            "must be positive (images are divided by it)",
            "use 1.0 for no scaling",
        )


def _check_datasets_given(cfg, training):
    if training and not cfg.DATASETS.TRAIN:
        _fail(
            "DATASETS.TRAIN",
            cfg.DATASETS.TRAIN,
            "is empty: nothing to train on",
            "name at least one registered dataset",
        )
    if not training and not cfg.DATASETS.TEST:
        _fail(
            "DATASETS.TEST",
            cfg.DATASETS.TEST,
            "is empty: --eval-only has nothing to evaluate",
            "name at least one registered dataset",
        )


def _check_input_lists(cfg):
    sizes, style = list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if style not in ("choice", "range"):
        _fail(
            "INPUT.MIN_SIZE_TRAIN_SAMPLING",
            style,
            "is not a sampling style",
            "use 'choice' (one of INPUT.MIN_SIZE_TRAIN) or 'range' (between its two values)",
        )
    if style == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        _fail(
            "INPUT.MIN_SIZE_TRAIN",
            sizes,
            "must be [low, high] with INPUT.MIN_SIZE_TRAIN_SAMPLING 'range'",
            "give two sizes, e.g. [640, 800], or set the sampling to 'choice'",
        )
    crop = cfg.INPUT.CROP
    if not crop.ENABLED:
        return
    if crop.TYPE not in _CROP_TYPES:
        _fail("INPUT.CROP.TYPE", crop.TYPE, "is not a crop type", f"use one of {list(_CROP_TYPES)}")
    size, relative = list(crop.SIZE), crop.TYPE.startswith("relative")
    valid = len(size) == 2 and all(
        (0 < s <= 1) if relative else (isinstance(s, int) and s > 0) for s in size
    )
    if not valid or (crop.TYPE.endswith("_range") and size[0] > size[1]):
        what = "fractions in (0, 1]" if relative else "positive pixel counts"
        order = " with the first not above the second" if crop.TYPE.endswith("_range") else ""
        _fail(
            "INPUT.CROP.SIZE",
            size,
            f"must be two {what}{order} for INPUT.CROP.TYPE={crop.TYPE!r}",
            "e.g. [0.9, 0.9] (relative) or [384, 600] (absolute)",
        )


def _check_resnet_lists(cfg):
    if "resnet" not in cfg.MODEL.BACKBONE.NAME:
        return
    r = cfg.MODEL.RESNETS
    unknown = [f for f in r.OUT_FEATURES if f not in RESNET_FEATURES]
    if not r.OUT_FEATURES or unknown:
        _fail(
            "MODEL.RESNETS.OUT_FEATURES",
            r.OUT_FEATURES,
            "must name ResNet outputs" + (f" ({_show(unknown)} are not)" if unknown else ""),
            f"use some of {list(RESNET_FEATURES)}, e.g. ['res2', 'res3', 'res4', 'res5'] "
            "for FPN",
        )
    if len(r.DEFORM_ON_PER_STAGE) != 4:
        _fail(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            r.DEFORM_ON_PER_STAGE,
            "needs one flag per stage res2..res5 (4)",
            "e.g. [False, False, False, False]",
        )
    if "fpn" not in cfg.MODEL.BACKBONE.NAME:
        return
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in r.OUT_FEATURES]
    order = [f for f in RESNET_FEATURES[1:] if f in in_features]
    if not in_features or missing or in_features != order or _gaps(order):
        problem = (
            f"names {_show(missing)}, which MODEL.RESNETS.OUT_FEATURES="
            f"{_show(r.OUT_FEATURES)} does not produce"
            if missing
            else "must be consecutive ResNet stages in order (FPN merges each level with the "
            "next, 2x coarser one)"
        )
        _fail(
            "MODEL.FPN.IN_FEATURES",
            in_features,
            problem,
            "e.g. ['res2', 'res3', 'res4', 'res5'] (each also in MODEL.RESNETS.OUT_FEATURES)",
        )


def _gaps(stages):
    levels = [RESNET_FEATURES.index(s) for s in stages]
    return any(b != a + 1 for a, b in zip(levels, levels[1:]))


def _backbone_features(cfg):
    """``{name: ShapeSpec}`` of the features the backbone produces (built on ``meta``)."""
    try:
        return build_on(cfg, "meta", build_backbone).output_shape()
    except Exception:  # reported by _check_model_builds with its source line
        logging.getLogger(__name__).debug("cannot build the backbone on meta", exc_info=True)
        return None


def _consumers(cfg):
    """``(key, feature names)`` of every head that reads backbone features in this model."""
    arch, out = cfg.MODEL.META_ARCHITECTURE, []
    uses_rpn = arch in _RCNN + ("ProposalNetwork",)
    if uses_rpn and cfg.MODEL.PROPOSAL_GENERATOR.NAME in ("RPN", "RRPN"):
        out.append(("MODEL.RPN.IN_FEATURES", list(cfg.MODEL.RPN.IN_FEATURES)))
    if arch in _RCNN:
        out.append(("MODEL.ROI_HEADS.IN_FEATURES", list(cfg.MODEL.ROI_HEADS.IN_FEATURES)))
    if arch == "RetinaNet":
        out.append(("MODEL.RETINANET.IN_FEATURES", list(cfg.MODEL.RETINANET.IN_FEATURES)))
    if arch in ("SemanticSegmentor", "PanopticFPN"):
        out.append(("MODEL.SEM_SEG_HEAD.IN_FEATURES", list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)))
    return out


def _check_in_features(cfg, features):
    if features is None:
        return
    produced = list(features)
    for key, names in _consumers(cfg):
        missing = [n for n in names if n not in features]
        if not names or missing:
            problem = (
                f"names {_show(missing)}, which MODEL.BACKBONE.NAME="
                f"{cfg.MODEL.BACKBONE.NAME!r} does not produce"
                if missing
                else "is empty"
            )
            _fail(key, names, problem, f"use some of the backbone's features {produced}")
        if key == "MODEL.ROI_HEADS.IN_FEATURES" and not _is_pyramid(features, names):
            _fail(
                key,
                names,
                "must be consecutive pyramid levels, finest first (the ROI pooler "
                "gives each box the level that fits its size)",
                "e.g. ['p2', 'p3', 'p4', 'p5']",
            )
        channels = {features[n].channels for n in names}
        if len(channels) > 1 and key != "MODEL.SEM_SEG_HEAD.IN_FEATURES":
            _fail(
                key,
                names,
                f"mixes features of {sorted(channels)} channels (the head is "
                "shared across them)",
                "use features of one width, e.g. the FPN's p2..p6",
            )


def _is_pyramid(features, names):
    """Strides double from each feature to the next (unknown strides: not compared)."""
    strides = [features[n].stride for n in names]
    if None in strides:
        return True
    return all(b == 2 * a for a, b in zip(strides, strides[1:]))


def _anchor_levels(cfg):
    """``(key of the feature list, number of levels)`` the anchor generator is applied to."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return "MODEL.RETINANET.IN_FEATURES", len(cfg.MODEL.RETINANET.IN_FEATURES)
    if arch in _RCNN + ("ProposalNetwork",) and cfg.MODEL.PROPOSAL_GENERATOR.NAME in (
        "RPN",
        "RRPN",
    ):
        return "MODEL.RPN.IN_FEATURES", len(cfg.MODEL.RPN.IN_FEATURES)
    return None, 0


def _per_level(key, params, levels, features_key):
    """``params`` broadcast to ``levels`` lists, as detectron2's anchor generator does it."""
    if not _is_list(params) or not params:
        _fail(
            key,
            params,
            "must be a non-empty list",
            "e.g. [[32], [64], [128], [256], [512]] "
            "(one list per feature level) or [[32, 64, 128]] (the same on every level)",
        )
    if not _is_list(params[0]):
        return [list(params)] * levels
    if len(params) == 1:
        return [list(params[0])] * levels
    if len(params) != levels:
        _fail(
            key,
            params,
            f"gives {len(params)} levels but {features_key} has {levels} feature map(s)",
            f"give {levels} lists (one per level), or one list for all levels",
        )
    return [list(p) for p in params]


def _check_anchors(cfg):
    name = cfg.MODEL.ANCHOR_GENERATOR.NAME
    features_key, levels = _anchor_levels(cfg)
    if features_key is None or levels == 0:
        return
    if name not in ("DefaultAnchorGenerator", "RotatedAnchorGenerator"):
        return
    a = cfg.MODEL.ANCHOR_GENERATOR
    keys = ["SIZES", "ASPECT_RATIOS"] + (["ANGLES"] if name == "RotatedAnchorGenerator" else [])
    per_level = {}
    for k in keys:
        key = f"MODEL.ANCHOR_GENERATOR.{k}"
        per_level[k] = _per_level(key, a.get(k), levels, features_key)
        bad = [v for level in per_level[k] for v in level if k != "ANGLES" and not v > 0]
        if bad or any(not level for level in per_level[k]):
            _fail(
                key,
                a.get(k),
                "must hold positive values, at least one per level",
                "e.g. [[32], [64], [128], [256], [512]]",
            )
    counts = [1] * levels
    for k in keys:
        counts = [c * len(level) for c, level in zip(counts, per_level[k])]
    if len(set(counts)) > 1:
        _fail(
            "MODEL.ANCHOR_GENERATOR.SIZES",
            a.SIZES,
            "with ASPECT_RATIOS="
            f"{_show(a.ASPECT_RATIOS)} gives {counts} anchors per location on the levels of "
            f"{features_key}, but the head predicts the same number on every level",
            "give every level the same number of sizes (and of aspect ratios)",
        )


def _matchers(cfg):
    arch, out = cfg.MODEL.META_ARCHITECTURE, []
    if _anchor_levels(cfg)[0] == "MODEL.RPN.IN_FEATURES":
        out.append("MODEL.RPN")
    if arch in _RCNN:
        out.append("MODEL.ROI_HEADS")
    if arch == "RetinaNet":
        out.append("MODEL.RETINANET")
    return out


def _node(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_matchers(cfg):
    for prefix in _matchers(cfg):
        node = _node(cfg, prefix)
        thresholds, labels = list(node.IOU_THRESHOLDS), list(node.IOU_LABELS)
        if (
            not thresholds
            or not all(0 < t <= 1 for t in thresholds)
            or sorted(thresholds) != (thresholds)
        ):
            _fail(
                f"{prefix}.IOU_THRESHOLDS",
                thresholds,
                "must be IoU values in (0, 1] in increasing order",
                "e.g. [0.3, 0.7] (RPN) or [0.5] (ROI heads)",
            )
        if len(labels) != len(thresholds) + 1 or any(x not in _MATCHER_LABELS for x in labels):
            _fail(
                f"{prefix}.IOU_LABELS",
                labels,
                f"needs {len(thresholds) + 1} labels from "
                f"{list(_MATCHER_LABELS)}, one per interval of {prefix}.IOU_THRESHOLDS="
                f"{_show(thresholds)}",
                "e.g. [0, -1, 1] for two thresholds (negative, ignored, positive)",
            )


def _box_dim(cfg, rotated_name):
    return 5 if rotated_name in ("RRPN", "RROIHeads") else 4


def _check_box_weights(key, weights, dim):
    weights = list(weights)
    if len(weights) != dim or not all(w > 0 for w in weights):
        names = "(dx, dy, dw, dh" + (", da)" if dim == 5 else ")")
        _fail(
            key,
            weights,
            f"must be {dim} positive weights {names}",
            "e.g. [10.0, 10.0, 5.0, 5.0] (box head) or [1.0, 1.0, 1.0, 1.0] (RPN)",
        )


def _check_box_heads(cfg):
    m, arch = cfg.MODEL, cfg.MODEL.META_ARCHITECTURE
    if _anchor_levels(cfg)[0] == "MODEL.RPN.IN_FEATURES":
        _check_box_weights(
            "MODEL.RPN.BBOX_REG_WEIGHTS",
            m.RPN.BBOX_REG_WEIGHTS,
            _box_dim(cfg, m.PROPOSAL_GENERATOR.NAME),
        )
        dims = list(m.RPN.CONV_DIMS)
        if any(d != -1 and d <= 0 for d in dims):
            _fail(
                "MODEL.RPN.CONV_DIMS",
                dims,
                "must be channel counts of the RPN head's convs, or -1 (as wide as its input)",
                "e.g. [-1] (the default) or [256, 256]",
            )
    if arch == "RetinaNet":
        _check_box_weights("MODEL.RETINANET.BBOX_REG_WEIGHTS", m.RETINANET.BBOX_REG_WEIGHTS, 4)
    if arch not in _RCNN:
        return
    _check_box_weights(
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
        m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS,
        _box_dim(cfg, m.ROI_HEADS.NAME),
    )
    if m.ROI_HEADS.NAME == "CascadeROIHeads":
        ious, weights = list(m.ROI_BOX_CASCADE_HEAD.IOUS), list(
            m.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
        )
        if not ious or not all(0 < t <= 1 for t in ious):
            _fail(
                "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
                ious,
                "must hold one IoU in (0, 1] per cascade stage",
                "e.g. [0.5, 0.6, 0.7]",
            )
        if ious[0] != m.ROI_HEADS.IOU_THRESHOLDS[0]:
            _fail(
                "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
                ious,
                "must start with "
                f"MODEL.ROI_HEADS.IOU_THRESHOLDS[0]={m.ROI_HEADS.IOU_THRESHOLDS[0]}",
                "make the first stage's IoU equal to it",
            )
        if len(weights) != len(ious):
            _fail(
                "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
                weights,
                f"gives {len(weights)} "
                f"stage(s) but MODEL.ROI_BOX_CASCADE_HEAD.IOUS has {len(ious)}",
                "give one 4-weight list per stage",
            )
        for w in weights:
            _check_box_weights("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", w, 4)
    if m.KEYPOINT_ON:
        dims = list(m.ROI_KEYPOINT_HEAD.CONV_DIMS)
        if any(d <= 0 for d in dims):
            _fail(
                "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS",
                dims,
                "must be positive channel counts",
                "e.g. [512] * 8",
            )


def _check_test_lists(cfg):
    t, m = cfg.TEST, cfg.MODEL
    sigmas = list(t.KEYPOINT_OKS_SIGMAS)
    if m.KEYPOINT_ON and sigmas and len(sigmas) != m.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS:
        _fail(
            "TEST.KEYPOINT_OKS_SIGMAS",
            sigmas,
            f"has {len(sigmas)} value(s) but "
            f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS={m.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS}",
            "give one sigma per keypoint, or [] for COCO's 17",
        )
    if t.AUG.ENABLED and (not t.AUG.MIN_SIZES or any(s <= 0 for s in t.AUG.MIN_SIZES)):
        _fail(
            "TEST.AUG.MIN_SIZES",
            t.AUG.MIN_SIZES,
            "must hold positive sizes with TEST.AUG.ENABLED",
            "e.g. [400, 500, 600, 700, 800]",
        )
    for entry in t.EXPECTED_RESULTS:
        if not _is_list(entry) or len(entry) != 4:
            _fail(
                "TEST.EXPECTED_RESULTS",
                t.EXPECTED_RESULTS,
                "must hold [task, metric, value, tolerance] entries",
                "e.g. [['bbox', 'AP', 38.5, 0.2]]",
            )


def _check_model_builds(cfg):
    """The model built on ``meta`` (else the CPU); a failure is a one-line ConfigError."""
    errors = []
    for device in ("meta", "cpu"):
        try:
            return build_on(cfg, device)
        except Exception as e:  # any component's own check: reported below if both fail
            errors.append(e)
    e = errors[-1]
    fix = "fix the key that this component reads"
    if isinstance(e, ImportError):  # e.g. DeformConv without detectron2's compiled _C
        fix = "install what it needs, or use a config without that component"
    raise ConfigError(
        f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} cannot be built from this "
        f"config ({type(e).__name__}{_where(e)}: {first_line(e) or 'no message'}); {fix}"
    ) from None


def _where(error):
    """`` at <package>/<file>:<line>``, the innermost frame of the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    parts = frame.filename.split(os.sep)
    for package in ("detectron2", "megdet_d2", "torch"):
        if package in parts:
            parts = parts[len(parts) - parts[::-1].index(package) - 1 :]
            break
    return f" at {'/'.join(parts[-3:]) if len(parts) > 3 else '/'.join(parts)}:{frame.lineno}"
