"""NORM: "CGBN" in stock detectron2 configs builds CGBN everywhere and trains on 2 processes.

One spawned 2-process gloo run builds and trains four tiny model-zoo models (Faster R-CNN FPN
with a conv box head, RetinaNet, Mask R-CNN FPN, Panoptic FPN) with every norm key set to "CGBN";
the parent checks the module types per norm key, finite losses, and that the CGBN running
statistics moved and agree across ranks although each rank saw different images.
"""

import math

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import megdet_d2.layers  # noqa: F401  (registration: "CGBN" norm name)
from megdet_d2.config import add_megdet_config
from megdet_d2.layers import CGBN
from megdet_d2.layers.groups import create_cgbn_groups
from tests.utils.dist import run_distributed

_NUM_CLASSES = 3
_SEM_SEG_CLASSES = 4
_SIZE = 64

_TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "CGBN",
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.FPN.NORM", "CGBN",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 128,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.ROI_HEADS.NUM_CLASSES", _NUM_CLASSES,
    "MODEL.ROI_BOX_HEAD.NUM_CONV", 2,
    "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
    "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_BOX_HEAD.NORM", "CGBN",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.ROI_MASK_HEAD.NORM", "CGBN",
    "MODEL.RETINANET.NUM_CONVS", 2,
    "MODEL.RETINANET.NUM_CLASSES", _NUM_CLASSES,
    "MODEL.RETINANET.NORM", "CGBN",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", _SEM_SEG_CLASSES,
    "MODEL.SEM_SEG_HEAD.NORM", "CGBN",
]  # fmt: skip

# name -> (model-zoo config, expected number of norm layers under each module prefix). R-18 has
# 1 stem + 8 blocks x 2 + 3 shortcut norms; FPN one lateral + one output norm per input level.
_MODELS = {
    "faster_rcnn": (
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        {"backbone.bottom_up.": 20, "backbone.fpn_": 8, "roi_heads.box_head.": 2},
    ),
    "retinanet": (
        "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
        # the head's 2 norms per subnet are per FPN level (5), as detectron2 builds for SyncBN
        {"backbone.bottom_up.": 20, "backbone.fpn_": 6, "head.cls_subnet.": 10, "head.bbox_": 10},
    ),
    "mask_rcnn": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        {
            "backbone.bottom_up.": 20,
            "backbone.fpn_": 8,
            "roi_heads.box_head.": 2,
            "roi_heads.mask_head.": 2,
        },
    ),
    "panoptic_fpn": (
        "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
        {
            "backbone.bottom_up.": 20,
            "backbone.fpn_": 8,
            "roi_heads.box_head.": 2,
            "roi_heads.mask_head.": 2,
            "sem_seg_head.": 1 + 1 + 2 + 3,
        },
    ),
}

_NORM_TYPES = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def _tiny_cfg(config_file):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.merge_from_list(_TINY)
    return cfg


def _synthetic_batch(seed):
    """Two 64x64 images with 1-3 boxes each (masks = filled boxes), plus a semantic map."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(2):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        xy = torch.randint(0, _SIZE - 24, (n, 2), generator=gen).float()
        wh = torch.randint(12, 24, (n, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(n, _SIZE, _SIZE, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((_SIZE, _SIZE))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, _NUM_CLASSES, (n,), generator=gen)
        instances.gt_masks = BitMasks(masks)
        batch.append(
            {
                "image": torch.randint(0, 256, (3, _SIZE, _SIZE), generator=gen, dtype=torch.uint8),
                "instances": instances,
                "sem_seg": torch.randint(0, _SEM_SEG_CLASSES, (_SIZE, _SIZE), generator=gen),
            }
        )
    return batch


def _train_step(cfg, rank):
    torch.manual_seed(0)  # same initial weights on every rank, as DDP would broadcast
    model = build_model(cfg)
    model.train()
    norm_types = {
        n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, _NORM_TYPES)
    }
    cgbns = {n: m for n, m in model.named_modules() if isinstance(m, CGBN)}
    stats_before = {n: m.running_mean.clone() for n, m in cgbns.items()}
    params_before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    batch = _synthetic_batch(seed=100 + rank)  # different images on each rank
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    return {
        "norm_types": norm_types,
        "losses": {k: float(v) for k, v in losses.items()},
        "stats_before": stats_before,
        "stats_after": {n: m.running_mean.clone() for n, m in cgbns.items()},
        "params_changed": sum(
            not torch.equal(p0, p.detach()) for p0, p in zip(params_before, model.parameters())
        ),
        "first_image": batch[0]["image"],
    }


def _train_all_models(rank, world_size):
    layout = create_cgbn_groups(0)
    return {
        "layout": layout,
        **{name: _train_step(_tiny_cfg(f), rank) for name, (f, _) in _MODELS.items()},
    }


@pytest.fixture(scope="module")
def results():
    return run_distributed(_train_all_models, world_size=2, timeout=240)


@pytest.mark.parametrize("name", list(_MODELS))
def test_every_norm_is_cgbn(results, name):
    expected_counts = _MODELS[name][1]
    norm_types = results[0][name]["norm_types"]
    assert set(norm_types.values()) == {"CGBN"}, norm_types
    for prefix, count in expected_counts.items():
        assert sum(n.startswith(prefix) for n in norm_types) == count, (prefix, norm_types)
    assert len(norm_types) == sum(expected_counts.values()), norm_types


@pytest.mark.parametrize("name", list(_MODELS))
def test_two_process_train_step(results, name):
    r0, r1 = results[0][name], results[1][name]
    assert not torch.equal(r0["first_image"], r1["first_image"])
    for r in (r0, r1):
        assert r["losses"] and all(math.isfinite(v) for v in r["losses"].values()), r["losses"]
        assert r["params_changed"] > 0
        unchanged = [
            n for n in r["stats_before"] if torch.equal(r["stats_before"][n], r["stats_after"][n])
        ]
        assert not unchanged, unchanged
    # CGBN statistics are over both ranks' images: identical on the two ranks.
    assert r0["stats_after"].keys() == r1["stats_after"].keys()
    for n in r0["stats_after"]:
        torch.testing.assert_close(r0["stats_after"][n], r1["stats_after"][n], msg=n)


def test_cgbn_group_layout(results):
    assert [r["layout"] for r in results] == [[[0, 1]], [[0, 1]]]


def test_base_config_builds_cgbn_model():
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file("configs/Base-MegDet-RCNN-FPN.yaml")
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == "CGBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.SOLVER.MEGDET.SCHEDULE == "normal"
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    )
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    # Stem and res2 are frozen (FREEZE_AT 2): detectron2 turns their BN into FrozenBN.
    frozen = [bottom_up.stem, bottom_up.res2]
    assert all(
        type(m) is FrozenBatchNorm2d
        for part in frozen
        for m in part.modules()
        if isinstance(m, _NORM_TYPES)
    )
    trained = [bottom_up.res3, bottom_up.res4, bottom_up.res5] + list(model.backbone.lateral_convs)
    trained += list(model.backbone.output_convs)
    norms = [m for part in trained for m in part.modules() if isinstance(m, _NORM_TYPES)]
    assert len(norms) == 6 * 2 + 3 + 8 and all(type(m) is CGBN for m in norms)
