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

__all__ = [
    "CLASSES",
    "TRAIN_NAME",
    "VAL_NAME",
    "generate_split",
    "prepare_quickstart_data",
    "register_quickstart_datasets",
]

CLASSES = ("square", "circle", "triangle")
TRAIN_NAME = "megdet_shapes_train"
VAL_NAME = "megdet_shapes_val"

logger = logging.getLogger(__name__)


def _draw_shape(draw, shape, box, colour):
    """Draw one filled shape inside ``box`` (x0, y0, x1, y1); return its COCO polygon."""
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).ravel().tolist()
    else:  # triangle, apex up
        pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
        draw.polygon(pts, fill=colour)
        poly = [c for p in pts for c in p]
    return [round(float(v), 2) for v in poly]


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


def generate_split(image_dir, num_images, image_size, seed, max_objects=4, aspect_ratios=(1.0,)):
    """Draw ``num_images`` PNGs into ``image_dir``; return the COCO instances dict for them.

    Each image's width / height is drawn from ``aspect_ratios`` (by its own generator, so the
    default square images are the same bytes as before the option existed).
    """
    rng = np.random.default_rng(seed)
    ratio_rng = np.random.default_rng([seed, 1])
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        ratio = aspect_ratios[int(ratio_rng.integers(len(aspect_ratios)))]
        width, height = canvas_size(image_size, ratio)
        small = min(width, height)
        background = tuple(int(v) for v in rng.integers(0, 90, size=3))
        canvas = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(canvas)
        boxes = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(10):  # place without heavy overlap, so every box is visible
                side = int(rng.integers(small // 8, small * 3 // 8 + 1))
                highs = [width - side + 1, height - side + 1]
                x0, y0 = (int(v) for v in rng.integers(0, highs))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_iou(box, b) < 0.1 for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            category = int(rng.integers(len(CLASSES)))
            colour = tuple(int(v) for v in rng.integers(120, 256, size=3))
            polygon = _draw_shape(draw, CLASSES[category], box, colour)
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
        file_name = f"{image_id:06d}.png"
        canvas.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def default_root():
    """Where detectron2 keeps datasets: ``$DETECTRON2_DATASETS`` (default ``./datasets``)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "megdet_shapes")


def prepare_quickstart_data(root, num_train, num_val, image_size, seed, aspect_ratios=(1.0,)):
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
                    aspect_ratios=aspect_ratios,
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


def register_quickstart_datasets(cfg):
    """Generate and register the quickstart splits if ``cfg.DATASETS`` names any of them."""
    used = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if not used & {TRAIN_NAME, VAL_NAME}:
        return
    check_upgraded(cfg)  # a DATASETS.QUICKSTART.* value must not be ignored silently
    q = cfg.MEGDET.QUICKSTART
    if not q.ASPECT_RATIOS or any(not r > 0 for r in q.ASPECT_RATIOS):
        raise ConfigError(
            f"MEGDET.QUICKSTART.ASPECT_RATIOS={list(q.ASPECT_RATIOS)} must be a non-empty list of "
            "widths / heights > 0; e.g. [1.0] (squares) or [0.75, 1.5]"
        )
    for key, minimum in (("NUM_TRAIN", 1), ("NUM_VAL", 1), ("IMAGE_SIZE", 32)):
        if q[key] < minimum:
            raise ConfigError(
                f"MEGDET.QUICKSTART.{key}={q[key]} must be at least {minimum}; set e.g. "
                f"{minimum if key != 'IMAGE_SIZE' else 128}"
            )
    try:
        paths = prepare_quickstart_data(
            q.ROOT, q.NUM_TRAIN, q.NUM_VAL, q.IMAGE_SIZE, q.SEED, aspect_ratios=q.ASPECT_RATIOS
        )
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
        register_coco_instances(name, {"thing_classes": list(CLASSES)}, json_file, image_root)
