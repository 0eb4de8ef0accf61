"""LinearScalingWarmupLR: exact LR sequences, registry dispatch, validation, resume, LazyConfig."""

import itertools
import math
import os
import re

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import SimpleTrainer, hooks
from detectron2.solver import LRMultiplier
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver import build_optimizer
from fvcore.common.param_scheduler import LinearParamScheduler

from megdet_d2.config import add_megdet_config
from megdet_d2.solver import (
    LR_SCHEDULER_REGISTRY,
    LinearScalingWarmupLR,
    apply_schedule_preset,
    build_lr_scheduler,
    check_solver_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@LR_SCHEDULER_REGISTRY.register()
def LinearDecayForTest(cfg, optimizer):
    """A user scheduler, registered where it is defined: BASE_LR decaying linearly to 0."""
    return LRMultiplier(optimizer, LinearParamScheduler(1.0, 0.0), max_iter=cfg.SOLVER.MAX_ITER)


def _cfg(batch=256, schedule="", epoch_size=117266, warmup=500, base_lr=0.02):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "LinearScalingWarmupLR"
    cfg.SOLVER.BASE_LR = base_lr
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.WARMUP_ITERS = warmup
    cfg.SOLVER.MEGDET.SCHEDULE = schedule
    cfg.SOLVER.MEGDET.EPOCH_SIZE = epoch_size
    apply_schedule_preset(cfg)
    return cfg


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 1)


def _lr_sequence(cfg, build=build_lr_scheduler, iters=None):
    """LR of every param group at each iteration, as detectron2's trainer steps them."""
    optimizer = build_optimizer(cfg, _model())
    scheduler = build(cfg, optimizer)
    lrs = []
    for _ in range(iters or cfg.SOLVER.MAX_ITER):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def _expected(cfg):
    """The MegDet policy written out per iteration, independent of fvcore."""
    s = cfg.SOLVER
    r, k, w = s.BASE_LR, s.IMS_PER_BATCH / s.MEGDET.REFERENCE_BATCH_SIZE, s.WARMUP_ITERS
    gammas = list(s.MEGDET.STEP_GAMMAS) or [s.GAMMA] * len(s.STEPS)
    out = []
    for t in range(s.MAX_ITER):
        peak = k * r * math.prod(g for step, g in zip(s.STEPS, gammas) if t >= step)
        if t < w:
            start = r if k > 1 else s.WARMUP_FACTOR * k * r
            out.append(start + (peak - start) * t / w)
        else:
            out.append(peak)
    return np.array(out)


def test_worked_example_normal():
    # BASE_LR 0.02 at batch 16, batch 256 (k = 16), 500 warmup iterations, COCO "normal".
    cfg = _cfg(batch=256, schedule="normal")
    lrs = _lr_sequence(cfg)[:, 0]
    assert len(lrs) == 5049
    assert np.allclose(lrs[[0, 250, 500]], [0.02, 0.17, 0.32])
    assert np.allclose(np.diff(lrs[:501]), 0.3 / 500)  # constant increment per iteration
    assert np.allclose(lrs[[3671, 3672, 4589, 4590, 5048]], [0.32, 0.032, 0.032, 0.0032, 0.0032])
    assert np.allclose(lrs, _expected(cfg))


def test_worked_example_long():
    cfg = _cfg(batch=256, schedule="long")
    lrs = _lr_sequence(cfg)[:, 0]
    assert len(lrs) == 8262
    assert np.allclose(lrs[[0, 250, 500]], [0.02, 0.17, 0.32])
    assert np.allclose(
        lrs[[5048, 5049, 6425, 6426, 7802, 7803, 8261]],
        [0.32, 0.032, 0.032, 0.0032, 0.0032, 0.0016, 0.0016],
    )
    assert np.allclose(lrs, _expected(cfg))


def test_small_sequence_written_out():
    # k = 4: 2 iterations per epoch, normal -> decays at 16 and 20, end at 22; 4 warmup iters.
    cfg = _cfg(batch=64, schedule="normal", epoch_size=128, warmup=4, base_lr=0.1)
    want = [0.1, 0.175, 0.25, 0.325] + [0.4] * 12 + [0.04] * 4 + [0.004] * 2
    assert np.allclose(_lr_sequence(cfg)[:, 0], want)


@pytest.mark.parametrize("schedule", ["normal", "long"])
@pytest.mark.parametrize("batch", [8, 16, 32, 256])
def test_presets_every_iteration(schedule, batch):
    cfg = _cfg(batch=batch, schedule=schedule, epoch_size=1000, warmup=20)
    lrs = _lr_sequence(cfg)[:, 0]
    assert len(lrs) == {"normal": 11, "long": 18}[schedule] * math.ceil(1000 / batch)
    assert np.allclose(lrs, _expected(cfg))
    k = batch / 16
    assert np.isclose(lrs[0], 0.02 if k > 1 else cfg.SOLVER.WARMUP_FACTOR * k * 0.02)
    assert np.isclose(lrs[20], k * 0.02)


def test_small_batch_matches_detectron2_warmup():
    # k = 1/2: no warmup from r, detectron2's linear warmup to k*r from WARMUP_FACTOR*k*r.
    cfg = _cfg(batch=8, warmup=100)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 400, (300,)
    lrs = _lr_sequence(cfg)[:, 0]
    assert np.isclose(lrs[0], 0.001 * 0.01) and np.allclose(lrs[100:300], 0.01)
    assert np.allclose(lrs, _expected(cfg))


def test_reference_batch_equals_detectron2_multistep():
    cfg = _cfg(batch=16, warmup=50)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 300, (200, 250)
    ours = _lr_sequence(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    assert np.allclose(ours, _lr_sequence(cfg, build=d2_build_lr_scheduler))


def test_step_gammas_without_preset():
    cfg = _cfg(batch=32, warmup=10)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 100, (40, 70)
    cfg.SOLVER.MEGDET.STEP_GAMMAS = [0.5, 0.2]
    lrs = _lr_sequence(cfg)[:, 0]
    assert np.allclose(lrs[[10, 39, 40, 69, 70, 99]], [0.04, 0.04, 0.02, 0.02, 0.004, 0.004])


def test_constant_warmup_method():
    cfg = _cfg(batch=64, warmup=10)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 30, ()
    cfg.SOLVER.WARMUP_METHOD = "constant"
    assert np.allclose(_lr_sequence(cfg)[:, 0], [0.02] * 10 + [0.08] * 20)


def test_bias_lr_factor_keeps_its_ratio():
    cfg = _cfg(batch=256, schedule="normal", epoch_size=2000, warmup=10)
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    lrs = _lr_sequence(cfg)
    assert lrs.shape == (cfg.SOLVER.MAX_ITER, 2)  # weight group, bias group
    assert np.allclose(lrs[:, 0], _expected(cfg))
    assert np.allclose(lrs[:, 1], 2.0 * lrs[:, 0])


class _LossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, data):
        return {"loss": (self.w * data).sum()}


def _simple_trainer(cfg):
    model = _LossModel()
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(2)), optimizer)
    scheduler = build_lr_scheduler(cfg, optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    return trainer, model


def test_detectron2_trainer_loop_uses_the_same_lrs():
    # The "lr" detectron2's LRScheduler hook logs for iteration t is the LR that step used.
    cfg = _cfg(batch=128, warmup=20)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 40, (30,)
    trainer, _ = _simple_trainer(cfg)
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    logged = [v for v, _ in trainer.storage.history("lr").values()]
    assert np.allclose(logged, _lr_sequence(cfg)[:, 0])
    assert np.allclose(logged[:21:10], [0.02, 0.09, 0.16])


def _run(model, optimizer, scheduler, iters):
    lrs = []
    for _ in range(iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    return lrs


def test_resume_restores_scheduler(tmp_path):
    cfg = _cfg(batch=256, schedule="long", epoch_size=2048, warmup=30)
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    total = cfg.SOLVER.MAX_ITER

    def fresh():
        model = _model()
        optimizer = build_optimizer(cfg, model)
        return model, optimizer, build_lr_scheduler(cfg, optimizer)

    model, optimizer, scheduler = fresh()
    uninterrupted = _run(model, optimizer, scheduler, total)
    final_weight = model.weight.detach().clone()

    lrs = []
    model, optimizer, scheduler = fresh()
    for start, stop in [(0, 17), (17, 40), (40, total)]:  # resume in and after the warmup
        if start:
            model, optimizer, scheduler = fresh()  # a new process: everything rebuilt
            DetectionCheckpointer(
                model, str(tmp_path), optimizer=optimizer, scheduler=scheduler
            ).resume_or_load("", resume=True)
            assert scheduler.last_epoch == start
        lrs += _run(model, optimizer, scheduler, stop - start)
        DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler).save(
            f"model_{stop - 1:07d}"
        )
    assert len(lrs) == total == 144
    assert np.allclose(lrs, uninterrupted)
    assert np.allclose(optimizer.param_groups[1]["lr"], 2 * optimizer.param_groups[0]["lr"])
    assert torch.allclose(model.weight, final_weight)


def test_resume_through_trainer_state(tmp_path):
    # DefaultTrainer's way: DetectionCheckpointer(model, dir, trainer=...) holds the LRScheduler
    # hook's state; the resumed run starts at the saved iteration + 1.
    cfg = _cfg(batch=64, warmup=10)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 30, (20,)
    trainer, _ = _simple_trainer(cfg)
    trainer.train(0, 30)
    uninterrupted = [v for v, _ in trainer.storage.history("lr").values()]

    trainer, model = _simple_trainer(cfg)
    trainer.train(0, 13)
    first = [v for v, _ in trainer.storage.history("lr").values()]
    trainer.iter = 12  # what PeriodicCheckpointer records after iteration 12
    DetectionCheckpointer(model, str(tmp_path), trainer=trainer).save("model_0000012")

    trainer, model = _simple_trainer(cfg)
    DetectionCheckpointer(model, str(tmp_path), trainer=trainer).resume_or_load("", resume=True)
    trainer.train(trainer.iter + 1, 30)
    second = [v for v, _ in trainer.storage.history("lr").values()]
    assert len(first) + len(second) == 30
    assert np.allclose(first + second, uninterrupted)


@pytest.mark.parametrize(
    "name", ["WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR"]
)
def test_stock_names_go_to_detectron2(name):
    cfg = _cfg(batch=256, warmup=10)
    cfg.SOLVER.LR_SCHEDULER_NAME = name
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 60, (40,)
    check_solver_config(cfg)
    optimizer = build_optimizer(cfg, _model())
    scheduler = build_lr_scheduler(cfg, optimizer)
    assert type(scheduler) is LRMultiplier
    # (detectron2's WarmupStepWithFixedGammaLR cannot step past its last iteration)
    lrs = _lr_sequence(cfg, iters=59)
    assert np.allclose(lrs, _lr_sequence(cfg, build=d2_build_lr_scheduler, iters=59))
    assert lrs.max() <= 0.02  # no linear scaling
    assert isinstance(build_lr_scheduler(_cfg(), optimizer), LinearScalingWarmupLR)


def test_user_registered_scheduler_is_used_by_name():
    cfg = _cfg(batch=256, warmup=10)
    cfg.SOLVER.LR_SCHEDULER_NAME = "LinearDecayForTest"
    cfg.SOLVER.MAX_ITER = 20
    check_solver_config(cfg)
    assert np.allclose(_lr_sequence(cfg)[:, 0], 0.02 * (1 - np.arange(20) / 20))


def test_unknown_name_is_detectron2s_error():
    cfg = _cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "NoSuchLR"
    with pytest.raises(ValueError, match="Unknown LR scheduler: NoSuchLR"):
        build_lr_scheduler(cfg, build_optimizer(cfg, _model()))


def _check_fails(cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        check_solver_config(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_accepts_defaults_and_presets():
    for schedule in ["", "normal", "long"]:
        check_solver_config(_cfg(schedule=schedule))
    cfg = get_cfg()
    add_megdet_config(cfg)
    check_solver_config(cfg)  # detectron2's own defaults


def test_check_reference_world_size():
    cfg = _cfg(schedule="normal")
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    msg = _check_fails(cfg, "SOLVER.REFERENCE_WORLD_SIZE=8 cannot be combined with")
    assert "set it to 0" in msg
    with pytest.raises(ValueError, match="SOLVER.REFERENCE_WORLD_SIZE=8"):
        build_lr_scheduler(cfg, build_optimizer(cfg, _model()))  # also when built directly


def test_check_warmup_longer_than_training():
    cfg = _cfg(schedule="normal", epoch_size=1000, warmup=44)
    _check_fails(cfg, "SOLVER.WARMUP_ITERS=44 must be smaller than SOLVER.MAX_ITER=44")


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_check_base_lr(lr):
    cfg = _cfg()
    cfg.SOLVER.BASE_LR = lr
    _check_fails(cfg, f"SOLVER.BASE_LR={lr} must be positive")


def test_check_unknown_scheduler_lists_names():
    cfg = _cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "LinearScalingWarmup"
    msg = _check_fails(cfg, "SOLVER.LR_SCHEDULER_NAME='LinearScalingWarmup' is not a known")
    for name in [
        "LinearScalingWarmupLR",
        "LinearDecayForTest",
        "WarmupMultiStepLR",
        "WarmupCosineLR",
        "WarmupStepWithFixedGammaLR",
    ]:
        assert f"'{name}'" in msg


def test_check_step_gammas():
    cfg = _cfg()
    cfg.SOLVER.STEPS = (100, 200)
    cfg.SOLVER.MEGDET.STEP_GAMMAS = [0.1]
    _check_fails(cfg, "SOLVER.MEGDET.STEP_GAMMAS=[0.1] needs one factor per step of")
    cfg = _cfg(schedule="long")
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    _check_fails(cfg, "SOLVER.MEGDET.STEP_GAMMAS=[0.1, 0.1, 0.5] is ignored by detectron2's")
    cfg.SOLVER.MEGDET.SCHEDULE = "normal"
    apply_schedule_preset(cfg)
    check_solver_config(cfg)  # [0.1, 0.1] is what detectron2 does with GAMMA 0.1


def test_check_steps_and_other_keys():
    cfg = _cfg()
    cfg.SOLVER.STEPS = (200, 100)
    _check_fails(cfg, "SOLVER.STEPS=(200, 100) must be positive and strictly increasing")
    cfg = _cfg()
    cfg.SOLVER.RESCALE_INTERVAL = True
    _check_fails(cfg, "SOLVER.RESCALE_INTERVAL=True is not supported")
    cfg = _cfg()
    cfg.SOLVER.MEGDET.REFERENCE_BATCH_SIZE = 0
    _check_fails(cfg, "SOLVER.MEGDET.REFERENCE_BATCH_SIZE=0 must be positive")


def test_lazy_config_example():
    cfg = LazyConfig.load(os.path.join(REPO, "configs/lazy/megdet_lr_example.py"))
    assert cfg.train.max_iter == 5049 and cfg.train.eval_period == 459
    # As detectron2's tools/lazyconfig_train_net.py does it:
    cfg.optimizer.params.model = _model()
    optimizer = instantiate(cfg.optimizer)
    scheduler = LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)
    lrs = []
    for _ in range(cfg.train.max_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert np.allclose(np.array(lrs)[[0, 250, 500, 3672, 4590]], [0.02, 0.17, 0.32, 0.032, 0.0032])
    assert np.allclose(lrs, _lr_sequence(_cfg(batch=256, schedule="normal"))[:, 0])
