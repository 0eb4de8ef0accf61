#!/usr/bin/env python
"""Pretrain detectron2's ResNet backbone on shape classification: the ImageNet stand-in.

The paper fine-tunes an ImageNet-pretrained ResNet-50 whose BN statistics come with it; nothing
can be downloaded here, so this script makes the analogue from the built-in data generator.
It draws images of a detection config's data (``MEGDET.QUICKSTART.*``, another seed than the
detection splits), crops every object with some context, and trains the config's
``build_resnet_backbone`` (BN trained, every stage) plus a linear head on the pooled res5 to
tell the shape classes apart. It writes a detectron2 checkpoint of the backbone only, named as
``build_model`` names it inside the FPN (``backbone.bottom_up.*``, BN running statistics
included, re-estimated on whole images of the detection size after training), so
``MODEL.WEIGHTS`` loads it with only the FPN and the detection heads missing.

The checkpoint is cached under ``--out-dir`` by a hash of every setting: a second call with
the same settings prints the cached result and returns at once. The last line printed is
``checkpoint PATH``. Prints top-1 accuracy on
crops of held-out images and the seconds it took (also in the ``.json`` next to the ``.pth``).

    python experiments/pretrain_backbone.py \
        --config-file configs/experiments/shapes_hard_R18_FPN.yaml --out-dir output/pretrained
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone
from PIL import Image

import megdet_d2  # noqa: F401  (registers CGBN)
from megdet_d2 import add_megdet_config
from megdet_d2.data import SHAPES, TRAIN_NAME, VAL_NAME, prepare_quickstart_data
from megdet_d2.data.quickstart import difficulty_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "experiments", "shapes_hard_R18_FPN.yaml")
PREFIX = "backbone.bottom_up."  # build_resnet_fpn_backbone's FPN holds the ResNet as bottom_up
VERSION = 3  # bump when the training below changes: old caches are not reused
DATA_SEED = 1000  # images other than the detection splits' (QUICKSTART.SEED and SEED + 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=CONFIG, help="detection config: data, ResNet")
    parser.add_argument("--out-dir", default=os.path.join("output", "pretrained"))
    parser.add_argument("--steps", type=int, default=800, help="SGD steps")
    parser.add_argument("--batch", type=int, default=64, help="crops per step")
    parser.add_argument("--lr", type=float, default=0.1, help="peak LR (cosine decay)")
    parser.add_argument("--num-images", type=int, default=1200, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="held-out images")
    parser.add_argument("--crop", type=int, default=32, help="crop side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.num_images < 1 or args.num_val < 1:
        parser.error("need --steps >= 1, --batch >= 2, --num-images >= 1, --num-val >= 1")
    return args


def load_config(config_file):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(config_file)
    return cfg


def settings(args, cfg):
    """Everything the checkpoint depends on (its cache key)."""
    q = cfg.MEGDET.QUICKSTART
    return {
        "version": VERSION,
        "depth": cfg.MODEL.RESNETS.DEPTH,
        "res2_out_channels": cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
        "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "input_format": cfg.INPUT.FORMAT,
        "image_size": q.IMAGE_SIZE,
        "aspect_ratios": list(q.ASPECT_RATIOS),
        "difficulty": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in difficulty_from_config(q).items()},  # fmt: skip
        **{k: getattr(args, k) for k in
           ("steps", "batch", "lr", "num_images", "num_val", "crop", "seed")},  # fmt: skip
    }


def cache_paths(args, cfg):
    """(checkpoint, result json) paths keyed by the settings' hash."""
    text = json.dumps(settings(args, cfg), sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    name = f"R{cfg.MODEL.RESNETS.DEPTH}_shapes_{key}"
    return os.path.join(args.out_dir, name + ".pth"), os.path.join(args.out_dir, name + ".json")


def object_crops(json_file, image_root, cfg, crop):
    """Every object of a split as a (N, 3, crop, crop) float tensor in the detector's input
    format and normalisation, and its class index (N,)."""
    with open(json_file) as f:
        coco = json.load(f)
    files = {im["id"]: os.path.join(image_root, im["file_name"]) for im in coco["images"]}
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    crops, labels, images = [], [], {}
    for ann in coco["annotations"]:
        if ann["image_id"] not in images:
            images[ann["image_id"]] = Image.open(files[ann["image_id"]]).convert("RGB")
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        m = 0.25 * max(w, h)  # context around the object
        box = tuple(round(v) for v in (x - m, y - m, x + w + m, y + h + m))  # black outside
        pixels = np.asarray(image.crop(box).resize((crop, crop), Image.BILINEAR), np.float32)
        if cfg.INPUT.FORMAT == "BGR":
            pixels = pixels[:, :, ::-1]
        crops.append((torch.from_numpy(pixels.copy()).permute(2, 0, 1) - mean) / std)
        labels.append(ann["category_id"] - 1)
    return torch.stack(crops), torch.tensor(labels)


def build_classifier(cfg, num_classes):
    """(backbone, head): the config's ResNet with trained BN in every stage, and a linear
    layer on its pooled last stage."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    head = torch.nn.Linear(backbone.output_shape()["res5"].channels, num_classes)
    return backbone, head


def _logits(backbone, head, x):
    return head(F.adaptive_avg_pool2d(backbone(x)["res5"], 1).flatten(1))


@torch.no_grad()
def accuracy(backbone, head, crops, labels, batch=256):
    """Top-1 accuracy (%) in eval mode (running statistics)."""
    backbone.eval()
    correct = sum(
        (_logits(backbone, head, crops[i : i + batch]).argmax(1) == labels[i : i + batch]).sum()
        for i in range(0, len(crops), batch)
    )
    return 100.0 * float(correct) / len(crops)


@torch.no_grad()
def recalibrate_bn(backbone, json_file, image_root, cfg, batch=16):
    """Re-estimate every BN's running statistics on whole images of the detection size (a
    cumulative average over them): the statistics the detector's FrozenBN keeps, as an
    ImageNet model's come from its own images, not from the crops it was trained on."""
    with open(json_file) as f:
        images = json.load(f)["images"]
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    backbone.train()
    by_size = {}
    for im in images:  # one tensor per canvas size
        pixels = np.asarray(Image.open(os.path.join(image_root, im["file_name"])).convert("RGB"))
        by_size.setdefault(pixels.shape, []).append(
            pixels[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else pixels
        )
    for group in by_size.values():
        for i in range(0, len(group), batch):
            x = torch.from_numpy(np.stack(group[i : i + batch]).astype(np.float32))
            backbone((x.permute(0, 3, 1, 2) - mean) / std)
    for m in norms:
        m.momentum = 0.1


def pretrain(args, cfg):
    """Train; return (backbone state dict, result dict)."""
    start = time.monotonic()
    torch.manual_seed(args.seed)
    q = cfg.MEGDET.QUICKSTART
    paths = prepare_quickstart_data(
        os.path.join(args.out_dir, "data"), args.num_images, args.num_val, q.IMAGE_SIZE,
        DATA_SEED + args.seed, aspect_ratios=q.ASPECT_RATIOS, **difficulty_from_config(q),
    )  # fmt: skip
    train_x, train_y = object_crops(*paths[TRAIN_NAME], cfg, args.crop)
    val_x, val_y = object_crops(*paths[VAL_NAME], cfg, args.crop)
    backbone, head = build_classifier(cfg, q.NUM_CLASSES)
    params = list(backbone.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim > 1]  # no weight decay on BN and biases
    rest = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(args.seed)
    backbone.train()
    for step in range(args.steps):
        idx = torch.randint(len(train_x), (args.batch,), generator=generator)
        x = train_x[idx]
        shift = torch.randint(-3, 4, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))  # small translations
        loss = F.cross_entropy(_logits(backbone, head, x), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            seconds = time.monotonic() - start
            print(f"step {step}: loss {loss.item():.3f}, {seconds:.0f} s", flush=True)
    crop_top1 = accuracy(backbone, head, val_x, val_y)
    recalibrate_bn(backbone, *paths[TRAIN_NAME], cfg)
    result = {
        "top1": accuracy(backbone, head, val_x, val_y),  # with the checkpoint's statistics
        "top1_crop_statistics": crop_top1,  # with the statistics of training (crops)
        "train_top1": accuracy(backbone, head, train_x[:2000], train_y[:2000]),
        "chance": 100.0 / q.NUM_CLASSES,
        "classes": list(SHAPES[: q.NUM_CLASSES]),
        "train_crops": len(train_x),
        "val_crops": len(val_x),
        "seconds": time.monotonic() - start,
    }
    state = {PREFIX + k: v for k, v in backbone.state_dict().items()}
    return state, result


def main(argv=None):
    """Pretrain (or find the cached checkpoint); return (checkpoint path, result dict)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file)
    pth, info = cache_paths(args, cfg)
    if os.path.isfile(pth) and os.path.isfile(info):
        with open(info) as f:
            result = json.load(f)["result"]
        print(f"cached (top-1 {result['top1_crop_statistics']:.1f} %)\ncheckpoint {pth}")
        return pth, result
    state, result = pretrain(args, cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = pth + f".{os.getpid()}.tmp"
    torch.save({"model": state, "__author__": "megdet_d2 experiments/pretrain_backbone.py"}, tmp)
    os.replace(tmp, pth)  # complete or absent: an interrupted run is not cached
    with open(info + ".tmp", "w") as f:
        json.dump({"settings": settings(args, cfg), "result": result}, f, indent=1)
    os.replace(info + ".tmp", info)
    print(
        f"wrote {pth}: top-1 {result['top1_crop_statistics']:.1f} % on {result['val_crops']} "
        f"held-out crops ({result['top1']:.1f} % with the whole-image BN statistics saved; "
        f"chance {result['chance']:.1f} %), {result['seconds']:.0f} s\ncheckpoint {pth}"
    )
    return pth, result


if __name__ == "__main__":
    main()
