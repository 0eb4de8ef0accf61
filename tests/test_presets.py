"""Schedule presets: epochs → iterations, written into the cfg, idempotent, counted data sets."""

import functools
import re

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from megdet_d2 import ConfigError
from megdet_d2.config import add_megdet_config
from megdet_d2.solver import (
    SCHEDULE_PRESETS,
    SchedulePreset,
    apply_schedule_preset,
    check_solver_config,
    derive_schedule,
    schedule_summary,
)


@SCHEDULE_PRESETS.register()
def short_for_test():
    """A user preset, registered where it is defined: x0.1 at epoch 2, end at 3."""
    return SchedulePreset(decay_epochs=(2,), decay_factors=(0.1,), end_epoch=3)


def _cfg(schedule="normal", epoch_size=117266, batch=256, warmup=500):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "LinearScalingWarmupLR"
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.WARMUP_ITERS = warmup
    cfg.SOLVER.MEGDET.SCHEDULE = schedule
    cfg.SOLVER.MEGDET.EPOCH_SIZE = epoch_size
    return cfg


def test_paper_presets_on_coco_at_batch_256():
    normal = derive_schedule("normal", epoch_size=117266, ims_per_batch=256)
    assert normal["iters_per_epoch"] == 459
    assert normal["steps"] == [3672, 4590] and normal["max_iter"] == 5049
    assert normal["step_gammas"] == [0.1, 0.1]
    long = derive_schedule("long", epoch_size=117266, ims_per_batch=256)
    assert long["steps"] == [5049, 6426, 7803] and long["max_iter"] == 8262
    assert long["step_gammas"] == [0.1, 0.1, 0.5]


def test_iterations_scale_with_batch_size():
    # ceil: a partial last batch is still an iteration
    assert derive_schedule("normal", 1000, 256)["iters_per_epoch"] == 4
    at16 = derive_schedule("normal", 117266, 16)
    assert at16["iters_per_epoch"] == 7330 and at16["max_iter"] == 80630
    assert at16["steps"] == [58640, 73300]


def test_epochs_stretch_or_shrink_a_preset():
    """SOLVER.MEGDET.EPOCHS: the preset's decays at the same fractions of a shorter run."""
    eight = derive_schedule("normal", epoch_size=256, ims_per_batch=4, epochs=8)  # 64 it/epoch
    assert eight["max_iter"] == 8 * 64
    assert eight["steps"] == [round(8 * 8 / 11 * 64), round(8 * 10 / 11 * 64)] == [372, 465]
    assert eight["step_gammas"] == [0.1, 0.1]
    assert derive_schedule("long", 117266, 256, epochs=18) == derive_schedule("long", 117266, 256)
    with pytest.raises(ValueError, match="SOLVER.MEGDET.EPOCHS=1 leaves preset 'long' no room"):
        derive_schedule("long", epoch_size=8, ims_per_batch=4, epochs=1)  # 2 iterations


def test_apply_writes_derived_numbers_into_cfg():
    cfg = _cfg("long")
    derived = apply_schedule_preset(cfg)
    assert derived == {
        "schedule": "long",
        "epoch_size": 117266,
        "iters_per_epoch": 459,
        "max_iter": 8262,
        "steps": [5049, 6426, 7803],
        "step_gammas": [0.1, 0.1, 0.5],
        "eval_period": 459,
        "checkpoint_period": 459,
    }
    s = cfg.SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS), list(s.MEGDET.STEP_GAMMAS)) == (
        8262,
        (5049, 6426, 7803),
        [0.1, 0.1, 0.5],
    )
    assert s.MEGDET.ITERS_PER_EPOCH == 459
    assert cfg.TEST.EVAL_PERIOD == 459 and s.CHECKPOINT_PERIOD == 459
    check_solver_config(cfg)


def test_period_epochs():
    cfg = _cfg()
    cfg.SOLVER.MEGDET.EVAL_PERIOD_EPOCHS = 2
    cfg.SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS = 0  # keep as written
    cfg.SOLVER.CHECKPOINT_PERIOD = 1234
    derived = apply_schedule_preset(cfg)
    assert cfg.TEST.EVAL_PERIOD == derived["eval_period"] == 918
    assert cfg.SOLVER.CHECKPOINT_PERIOD == derived["checkpoint_period"] == 1234


def test_no_preset_leaves_cfg_alone():
    cfg = _cfg("")
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 1000, (700, 900)
    before = cfg.dump()
    assert apply_schedule_preset(cfg) == {}
    assert cfg.dump() == before


def test_idempotent_and_reloadable(tmp_path):
    cfg = _cfg("long")
    first = apply_schedule_preset(cfg)
    dumped = cfg.dump()
    assert apply_schedule_preset(cfg) == first and cfg.dump() == dumped

    # --resume / --eval-only with the config.yaml default_setup wrote:
    path = tmp_path / "config.yaml"
    path.write_text(dumped)
    reloaded = get_cfg()
    add_megdet_config(reloaded)
    reloaded.merge_from_file(str(path))
    assert apply_schedule_preset(reloaded) == first
    assert reloaded.SOLVER == cfg.SOLVER and reloaded.TEST == cfg.TEST

    # The same file with another batch size re-derives for that batch size.
    reloaded.SOLVER.IMS_PER_BATCH = 16
    assert apply_schedule_preset(reloaded)["max_iter"] == 18 * 7330


def test_frozen_cfg_is_not_mutated():
    cfg = _cfg()
    cfg.freeze()
    with pytest.raises(AttributeError):
        apply_schedule_preset(cfg)
    assert cfg.SOLVER.MAX_ITER == get_cfg().SOLVER.MAX_ITER


def test_user_registered_preset():
    cfg = _cfg("short_for_test", epoch_size=1000, batch=100, warmup=5)
    derived = apply_schedule_preset(cfg)
    assert (derived["steps"], derived["max_iter"]) == ([20], 30)
    check_solver_config(cfg)


@pytest.fixture
def tiny_dataset():
    """A registered training set: 6 images with a box, 4 without any annotation."""
    name = "megdet_test_presets_tiny"
    box = {"bbox": [0, 0, 4, 4], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}
    dicts = [
        {"file_name": f"{i}.png", "image_id": i, "height": 8, "width": 8, "annotations": anns}
        for i, anns in enumerate([[box]] * 6 + [[]] * 4)
    ]
    DatasetCatalog.register(name, lambda: dicts)
    yield name
    DatasetCatalog.remove(name)


@pytest.mark.parametrize("filter_empty, count", [(True, 6), (False, 10)])
def test_epoch_size_counts_registered_training_set(tiny_dataset, filter_empty, count):
    cfg = _cfg("short_for_test", epoch_size=0, batch=4)
    cfg.DATASETS.TRAIN = (tiny_dataset,)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    derived = apply_schedule_preset(cfg)
    assert derived["epoch_size"] == count
    assert derived["iters_per_epoch"] == -(-count // 4)
    assert cfg.SOLVER.MEGDET.EPOCH_SIZE == count  # written back: the dumped cfg won't recount


def _fails(cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        apply_schedule_preset(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_solver_config(cfg)
    return str(e.value)


def test_unknown_preset_lists_names():
    msg = _fails(_cfg("Normal"), "SOLVER.MEGDET.SCHEDULE='Normal' is not a registered preset")
    assert all(f"'{name}'" in msg for name in ["normal", "long", "short_for_test"])


def test_epoch_smaller_than_batch():
    _fails(
        _cfg(epoch_size=100, batch=256),
        "SOLVER.MEGDET.EPOCH_SIZE=100 is smaller than SOLVER.IMS_PER_BATCH=256",
    )
    _fails(_cfg(epoch_size=-5, batch=256), "SOLVER.MEGDET.EPOCH_SIZE=-5 is smaller than")


def test_bad_batch_and_periods():
    _fails(_cfg(batch=0), "SOLVER.IMS_PER_BATCH=0 must be a positive multiple")
    cfg = _cfg()
    cfg.SOLVER.MEGDET.EVAL_PERIOD_EPOCHS = -1
    _fails(cfg, "SOLVER.MEGDET.EVAL_PERIOD_EPOCHS=-1 is negative")


def test_preset_definition_is_checked():
    with pytest.raises(ValueError, match="same length"):
        SchedulePreset(decay_epochs=(8, 10), decay_factors=(0.1,), end_epoch=11)
    with pytest.raises(ValueError, match="strictly increasing"):
        SchedulePreset(decay_epochs=(10, 8), decay_factors=(0.1, 0.1), end_epoch=11)


@pytest.mark.parametrize(
    "key, value, hint",
    [
        ("SOLVER.MAX_ITER", 10, "or set SOLVER.MEGDET.SCHEDULE '' to use SOLVER.MAX_ITER / STEPS"),
        ("SOLVER.STEPS", (100,), "or set SOLVER.MEGDET.SCHEDULE '' to use SOLVER.MAX_ITER / STE"),
        ("TEST.EVAL_PERIOD", 50, "or set SOLVER.MEGDET.EVAL_PERIOD_EPOCHS 0 to keep TEST.EVAL_PER"),
    ],
)
def test_preset_never_replaces_an_explicit_value(key, value, hint):
    cfg = _cfg()
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, cfg), leaf, value)
    with pytest.raises(ConfigError) as exc:
        apply_schedule_preset(cfg, explicit={key: "on the command line"})
    message = str(exc.value)
    assert message.startswith(f"{key}={value!r} is set on the command line, but SOLVER.MEGDET."
                              "SCHEDULE='normal' derives")  # fmt: skip
    assert hint in message, message
    assert cfg.SOLVER.MAX_ITER != 5049  # nothing written


def test_explicit_value_equal_to_the_derived_one_or_not_derived_is_fine():
    cfg = _cfg()
    cfg.SOLVER.MAX_ITER = 5049  # what "normal" derives here, e.g. a reloaded config.yaml
    cfg.SOLVER.MEGDET.EVAL_PERIOD_EPOCHS, cfg.TEST.EVAL_PERIOD = 0, 50  # kept as written
    explicit = {"SOLVER.MAX_ITER": "in 'x.yaml'", "TEST.EVAL_PERIOD": "on the command line"}
    apply_schedule_preset(cfg, explicit=explicit)
    assert cfg.SOLVER.MAX_ITER == 5049 and cfg.TEST.EVAL_PERIOD == 50
    assert schedule_summary(cfg) == (
        "Schedule preset 'normal': 117266 images per epoch / SOLVER.IMS_PER_BATCH 256 = 459 "
        "iterations per epoch -> SOLVER.MAX_ITER 5049, SOLVER.STEPS (3672, 4590) (factors "
        "[0.1, 0.1]), TEST.EVAL_PERIOD 50, SOLVER.CHECKPOINT_PERIOD 459"
    )
