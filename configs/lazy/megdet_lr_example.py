"""
MegDet's LR policy in a LazyConfig (for detectron2's tools/lazyconfig_train_net.py): mini-batch
256 on COCO train2017 (117266 images after filtering), "normal" preset, 500 warmup iterations.

Only the solver part is shown; take ``model`` / ``dataloader`` from detectron2's model zoo configs
and set ``dataloader.train.total_batch_size = IMS_PER_BATCH``.
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from fvcore.common.param_scheduler import MultiStepParamScheduler

from megdet_d2.solver import LinearScalingWarmupParamScheduler, derive_schedule, step_values

IMS_PER_BATCH = 256
REFERENCE_BATCH_SIZE = 16  # BASE_LR below is the rate r for this many images
BASE_LR = 0.02
WARMUP_ITERS = 500

# {"iters_per_epoch": 459, "max_iter": 5049, "steps": [3672, 4590], "step_gammas": [0.1, 0.1]}
_schedule = derive_schedule("normal", epoch_size=117266, ims_per_batch=IMS_PER_BATCH)

train = get_config("common/train.py").train
train.max_iter = _schedule["max_iter"]
train.eval_period = _schedule["iters_per_epoch"]  # once per epoch
train.checkpointer.period = _schedule["iters_per_epoch"]

optimizer = get_config("common/optim.py").SGD
optimizer.lr = BASE_LR  # r; the multiplier below turns it into k * r

# LR of iteration t = optimizer.lr * lr_multiplier(t / max_iter): r at t=0, linear to k*r at
# t=WARMUP_ITERS (k = 256 / 16 = 16), then x0.1 at epochs 8 and 10.
lr_multiplier = L(LinearScalingWarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=step_values(_schedule["step_gammas"]),
        milestones=_schedule["steps"],
        num_updates=_schedule["max_iter"],
    ),
    scale=IMS_PER_BATCH / REFERENCE_BATCH_SIZE,
    warmup_length=WARMUP_ITERS / _schedule["max_iter"],
    warmup_factor=0.001,  # used only when IMS_PER_BATCH <= REFERENCE_BATCH_SIZE
)
