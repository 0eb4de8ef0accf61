"""LazyConfig example: the model zoo's Mask R-CNN R50-FPN with every norm switched to CGBN.

Norms are given by name: importing megdet_d2.layers makes Detectron2 resolve "CGBN" (see
megdet_d2.layers.norm_registry). ``L(CGBN)(...)`` or the ``CGBN`` class itself also work where a
callable is expected.
"""

from detectron2.model_zoo import get_config

import megdet_d2.layers  # noqa: F401  (registration: "CGBN" as a norm name)

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

# MegDet: trained (not frozen) BN, statistics shared across the GPUs of a machine (paper §3.3).
# Stem + res2 stay frozen (FrozenBN there), the Detectron / FPN convention for ImageNet-initialised
# R-50 that the paper builds on (it does not list frozen stages).
# fmt: off
model.backbone.bottom_up.stem.norm = \
    model.backbone.bottom_up.stages.norm = \
    model.backbone.norm = "CGBN"
# Detectron2's default box head has no convs; use 4 conv + 1 fc so the head norm is exercised.
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = \
    model.roi_heads.mask_head.conv_norm = "CGBN"
# fmt: on
model.backbone.bottom_up.freeze_at = 2

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# MegDet's base rate 0.02 at batch 16 (linear scaling rule, paper §3.2).
dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
