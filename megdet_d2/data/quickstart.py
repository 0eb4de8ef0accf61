"""Built-in quickstart data: coloured shapes on small canvases, as a real COCO dataset on disk.

A detector needs data before anything else can be shown to work. This module draws squares,
circles and triangles deterministically (same seed, same bytes), writes PNG images plus a COCO
instances json per split, and registers them with detectron2's ``register_coco_instances``, so the
whole stock pipeline (dataset mapper, COCOEvaluator, pycocotools) runs exactly as on COCO.
"""

import json
import logging
import os
import shutil
import tempfile

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image, ImageDraw

from ..config import check_upgraded
from ..errors import ConfigError
from .shapes import SHAPES, add_noise, draw_clutter, draw_shape

__all__ = [
    "CLASSES",
    "DIFFICULTY_DEFAULTS",
    "TRAIN_NAME",
    "VAL_NAME",
    "check_quickstart_config",
    "generate_split",
    "prepare_quickstart_data",
    "register_quickstart_datasets",
]

CLASSES = SHAPES[:3]  # the quickstart's classes (MEGDET.QUICKSTART.NUM_CLASSES 3)
# generate_split's options beyond size and seed, with the defaults that draw the quickstart data
DIFFICULTY_DEFAULTS = {
    "num_classes": 3,
    "max_objects": 4,
    "object_size": (0.125, 0.375),
    "max_overlap": 0.1,
    "clutter": 0,
    "noise": 0.0,
}
TRAIN_NAME = "megdet_shapes_train"
VAL_NAME = "megdet_shapes_val"

logger = logging.getLogger(__name__)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def canvas_size(image_size, aspect_ratio):
    """(width, height) of a canvas whose longer side is ``image_size`` and width / height is
    ``aspect_ratio`` (1: square, > 1: landscape, < 1: portrait)."""
    if aspect_ratio <= 0:
        raise ValueError(f"aspect ratio {aspect_ratio} must be > 0")
    short = max(1, round(image_size * min(aspect_ratio, 1 / aspect_ratio)))
    return (image_size, short) if aspect_ratio > 1 else (short, image_size)


def generate_split(
    image_dir, num_images, image_size, seed, aspect_ratios=(1.0,), **difficulty
):  # fmt: skip
    """Draw ``num_images`` PNGs into ``image_dir``; return the COCO instances dict for them.

    Each image's width / height is drawn from ``aspect_ratios`` (by its own generator, so the
    default square images are the same bytes as before the option existed). ``difficulty``
    (keys of :data:`DIFFICULTY_DEFAULTS`): ``num_classes`` shapes of :data:`SHAPES`, 1 to
    ``max_objects`` objects per image whose side is drawn in ``object_size`` x the shorter
    side, placed with IoU below ``max_overlap`` with the others, ``clutter`` unannotated
    distractors under them and Gaussian pixel ``noise`` (std, 0-255). Clutter and noise have
    their own generators too: the defaults draw the quickstart data byte for byte.
    """
    unknown = set(difficulty) - set(DIFFICULTY_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {list(DIFFICULTY_DEFAULTS)}")
    opts = {**DIFFICULTY_DEFAULTS, **difficulty}
    classes = SHAPES[: opts["num_classes"]]
    low, high = opts["object_size"]
    rng = np.random.default_rng(seed)
    ratio_rng = np.random.default_rng([seed, 1])
    clutter_rng = np.random.default_rng([seed, 2])
    noise_rng = np.random.default_rng([seed, 3])
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        ratio = aspect_ratios[int(ratio_rng.integers(len(aspect_ratios)))]
        width, height = canvas_size(image_size, ratio)
        small = min(width, height)
        background = tuple(int(v) for v in rng.integers(0, 90, size=3))
        canvas = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(canvas)
        draw_clutter(draw, clutter_rng, width, height, opts["clutter"])
        boxes = []
        for _ in range(int(rng.integers(1, opts["max_objects"] + 1))):
            for _attempt in range(10):  # place without heavy overlap, so every box is visible
                side = int(rng.integers(max(1, int(small * low)), int(small * high) + 1))
                highs = [width - side + 1, height - side + 1]
                x0, y0 = (int(v) for v in rng.integers(0, highs))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_iou(box, b) < opts["max_overlap"] for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            category = int(rng.integers(len(classes)))
            colour = tuple(int(v) for v in rng.integers(120, 256, size=3))
            polygon = draw_shape(draw, classes[category], box, colour, background)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [box[0], box[1], side, side],
                    "area": float(side * side),
                    "segmentation": [polygon],
                    "iscrowd": 0,
                }
            )
        if opts["noise"] > 0:
            canvas = add_noise(canvas, noise_rng, opts["noise"])
        file_name = f"{image_id:06d}.png"
        canvas.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def difficulty_suffix(difficulty):
    """Folder-name suffix of the options that differ from :data:`DIFFICULTY_DEFAULTS` ("" for
    the quickstart data, which keeps the folder name it always had)."""
    parts = []
    for key, default in DIFFICULTY_DEFAULTS.items():
        value = difficulty.get(key, default)
        if tuple(np.atleast_1d(value)) != tuple(np.atleast_1d(default)):
            text = "-".join(f"{v:g}" for v in np.atleast_1d(value))
            parts.append(f"{key.replace('_', '')}{text}")
    return "".join("_" + p for p in parts)


def difficulty_from_config(q):
    """generate_split's ``difficulty`` options from ``cfg.MEGDET.QUICKSTART``."""
    return {
        "num_classes": q.NUM_CLASSES,
        "max_objects": q.MAX_OBJECTS,
        "object_size": tuple(float(v) for v in q.OBJECT_SIZE),
        "max_overlap": q.MAX_OVERLAP,
        "clutter": q.CLUTTER,
        "noise": float(q.NOISE),
    }


def default_root():
    """Where detectron2 keeps datasets: ``$DETECTRON2_DATASETS`` (default ``./datasets``)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "megdet_shapes")


def prepare_quickstart_data(
    root, num_train, num_val, image_size, seed, aspect_ratios=(1.0,), **difficulty
):
    """Generate both splits under ``root`` once; return ``{dataset name: (json, image dir)}``.

    The folder name encodes every parameter, so different settings never mix. Generation goes to
    a temporary folder renamed into place, so processes that race here (each process of a
    multi-process job runs ``setup``) all end up reading one complete copy.
    """
    root = root or default_root()
    aspect_ratios = tuple(float(r) for r in aspect_ratios)
    for ratio in aspect_ratios:
        canvas_size(image_size, ratio)  # a bad ratio fails here, before any file is written
    name = f"seed{seed}_{image_size}px_{num_train}train_{num_val}val"
    if aspect_ratios != (1.0,):  # square data keeps the folder name it always had
        name += "_ar" + "-".join(f"{r:g}" for r in aspect_ratios)
    name += difficulty_suffix(difficulty)
    folder = os.path.join(root, name)
    splits = {TRAIN_NAME: ("train", num_train, seed), VAL_NAME: ("val", num_val, seed + 1)}
    paths = {
        name: (os.path.join(folder, f"{split}.json"), os.path.join(folder, split))
        for name, (split, _, _) in splits.items()
    }
    if not os.path.isdir(folder):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp_", dir=root)
        try:
            for split, num, split_seed in splits.values():
                os.makedirs(os.path.join(tmp, split))
                coco = generate_split(
                    os.path.join(tmp, split), num, image_size, split_seed,
                    aspect_ratios=aspect_ratios, **difficulty,
                )  # fmt: skip
                with open(os.path.join(tmp, f"{split}.json"), "w") as f:
                    json.dump(coco, f)
            os.rename(tmp, folder)
            logger.info(f"Generated quickstart data in {folder}")
        except OSError:
            if not os.path.isdir(folder):  # a real failure, not a lost race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _used(cfg):
    return bool((set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)) & {TRAIN_NAME, VAL_NAME})


def register_quickstart_datasets(cfg, check=True):
    """Generate and register the quickstart splits if ``cfg.DATASETS`` names any of them.
    ``check``: first :func:`check_quickstart_config` and ``check_upgraded`` (False: done by the
    start-up checks already)."""
    if not _used(cfg):
        return
    if check:
        check_upgraded(cfg)  # a DATASETS.QUICKSTART.* value must not be ignored silently
        check_quickstart_config(cfg)
    q = cfg.MEGDET.QUICKSTART
    try:
        paths = prepare_quickstart_data(
            q.ROOT, q.NUM_TRAIN, q.NUM_VAL, q.IMAGE_SIZE, q.SEED, aspect_ratios=q.ASPECT_RATIOS,
            **difficulty_from_config(q),
        )  # fmt: skip
    except OSError as e:
        raise ConfigError(
            f"MEGDET.QUICKSTART.ROOT={q.ROOT!r}: the quickstart data cannot be written there "
            f"({e.strerror}: {e.filename}); choose a folder you can write to"
        ) from None
    for name, (json_file, image_root) in paths.items():
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).json_file == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # thing_classes known at registration lets start-up checks compare NUM_CLASSES with it
        classes = list(SHAPES[: q.NUM_CLASSES])
        register_coco_instances(name, {"thing_classes": classes}, json_file, image_root)


def check_quickstart_config(cfg):
    """A one-line ``ConfigError`` for a ``MEGDET.QUICKSTART`` key outside its range (when
    ``cfg.DATASETS`` names a quickstart split)."""
    if not _used(cfg):
        return
    q = cfg.MEGDET.QUICKSTART
    if not q.ASPECT_RATIOS or any(not r > 0 for r in q.ASPECT_RATIOS):
        raise ConfigError(
            f"MEGDET.QUICKSTART.ASPECT_RATIOS={list(q.ASPECT_RATIOS)} must be a non-empty list of "
            "widths / heights > 0; e.g. [1.0] (squares) or [0.75, 1.5]"
        )
    for key, minimum in (("NUM_TRAIN", 1), ("NUM_VAL", 1), ("IMAGE_SIZE", 32), ("NUM_CLASSES", 1),
                         ("MAX_OBJECTS", 1), ("CLUTTER", 0), ("NOISE", 0)):  # fmt: skip
        if q[key] < minimum:
            raise ConfigError(
                f"MEGDET.QUICKSTART.{key}={q[key]} must be at least {minimum}; set e.g. "
                f"{minimum if key != 'IMAGE_SIZE' else 128}"
            )
    _check_difficulty(q)


def _check_difficulty(q):
    """A one-line ``ConfigError`` for harder-data keys outside their range."""
    if q.NUM_CLASSES > len(SHAPES):
        raise ConfigError(
            f"MEGDET.QUICKSTART.NUM_CLASSES={q.NUM_CLASSES}: there are {len(SHAPES)} shapes "
            f"{SHAPES}; set at most {len(SHAPES)}"
        )
    size = list(q.OBJECT_SIZE)
    if len(size) != 2 or not 0 < size[0] <= size[1] <= 1:
        raise ConfigError(
            f"MEGDET.QUICKSTART.OBJECT_SIZE={size} must be [low, high] with 0 < low <= high <= 1 "
            "(fractions of the shorter image side); e.g. [0.125, 0.375]"
        )
    if not 0 < q.MAX_OVERLAP <= 1:
        raise ConfigError(
            f"MEGDET.QUICKSTART.MAX_OVERLAP={q.MAX_OVERLAP} must be in (0, 1]; e.g. 0.1"
        )
