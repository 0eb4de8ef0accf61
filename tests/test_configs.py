"""Every config in configs/ loads; the COCO leaves reproduce the rows of the paper's Tables 2-3."""

import glob
import logging
import os

import pytest
from detectron2.config import LazyConfig, get_cfg

from megdet_d2.config import add_megdet_config
from megdet_d2.engine.layout import bn_size, check_written_for
from megdet_d2.engine.validate import check_norms
from megdet_d2.layers.groups import check_group_size
from megdet_d2.solver import check_solver_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
MEGDET = os.path.join(CONFIGS, "COCO-Detection", "megdet")
R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

# Paper Table 3: (batch size, BN size, # of GPUs, schedule, mmAP, time in hours).
# The "16-base" row (BN size 0: no BN) is Table 2's batch-16 row.
TABLE3 = [
    ("16-base", 0, 8, "normal", 36.2, 33.2),
    (2, 2, 2, "normal", 31.5, 131.2),
    (4, 4, 4, "normal", 34.9, 91.4),
    (8, 8, 8, "normal", 35.9, 71.5),
    (16, 2, 8, "normal", 31.0, 45.6),
    (16, 16, 8, "normal", 37.0, 39.5),
    (32, 32, 8, "normal", 37.3, 45.5),
    (64, 64, 8, "normal", 35.3, 40.9),
    (64, 32, 16, "normal", 37.1, 19.6),
    (64, 16, 32, "normal", 37.1, 11.2),
    (128, 32, 32, "normal", 37.1, 11.3),
    (128, 16, 64, "normal", 37.0, 6.5),
    (256, 32, 64, "normal", 37.1, 7.2),
    (256, 16, 128, "normal", 37.1, 4.1),
    (16, 16, 8, "long", 37.7, 65.2),
    (32, 32, 8, "long", 37.8, 60.3),
    (64, 32, 16, "long", 37.6, 30.1),
    (128, 32, 32, "long", 37.6, 15.8),
    (256, 32, 64, "long", 37.7, 9.4),
    (256, 16, 128, "long", 37.7, 5.4),
]
# Paper Table 2 (no BN): (batch size, half learning rate, mmAP or None = failed). GPU counts are
# not given; the configs assume 2 images per GPU, as in the 16-image baseline on 8 GPUs.
TABLE2 = [(16, False, 36.2), (32, False, 36.4), (64, False, None), (64, True, 36.0),
          (128, True, None)]  # fmt: skip


def _table3_file(batch, bn, schedule):
    if batch == "16-base":
        return "faster_rcnn_R_50_FPN_b16_frozenbn_normal.yaml"
    return f"faster_rcnn_R_50_FPN_b{batch}_bn{bn}_{schedule}.yaml"


def _table2_file(batch, half_lr):
    return f"faster_rcnn_R_50_FPN_b{batch}_frozenbn{'_halflr' if half_lr else ''}_normal.yaml"


def load_yaml(path):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(path)
    return cfg


ALL_YAML = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
ALL_LAZY = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True))


def test_every_config_loads():
    assert len(ALL_YAML) >= 27 and ALL_LAZY
    for path in ALL_YAML:
        cfg = load_yaml(path)
        assert cfg.SOLVER.IMS_PER_BATCH > 0, path
    for path in ALL_LAZY:
        cfg = LazyConfig.load(path)
        assert "train" in cfg or "model" in cfg, path


def test_quickstart_runs_on_cpu_on_a_gpu_machine():
    """The quickstart (and every test built on it) is CPU processes over gloo: with detectron2's
    default of "cuda", as on a GPU machine, --num-gpus 2 would need two GPUs."""
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.MODEL.DEVICE = "cuda"  # the default where a GPU is visible
    cfg.merge_from_file(os.path.join(CONFIGS, "quickstart", "shapes_R18_FPN.yaml"))
    assert cfg.MODEL.DEVICE == "cpu"


def test_one_leaf_per_paper_row_and_no_strays():
    expected = {_table3_file(b, bn, s) for b, bn, _, s, _, _ in TABLE3}
    expected |= {_table2_file(b, half) for b, half, _ in TABLE2}
    assert len(expected) == len(TABLE3) + len(TABLE2) - 1  # "16-base" is Table 2's 16 row
    assert {os.path.basename(p) for p in glob.glob(os.path.join(MEGDET, "*.yaml"))} == expected


@pytest.mark.parametrize("row", TABLE3, ids=lambda r: f"b{r[0]}_bn{r[1]}_{r[3]}")
def test_table3_rows(row):
    batch, bn, gpus, schedule, _, _ = row
    cfg = load_yaml(os.path.join(MEGDET, _table3_file(batch, bn, schedule)))
    per_machine = min(gpus, 8)
    assert cfg.SOLVER.IMS_PER_BATCH == (16 if batch == "16-base" else batch)
    assert cfg.MEGDET.WRITTEN_FOR.NUM_GPUS == gpus
    assert cfg.MEGDET.WRITTEN_FOR.BN_SIZE == bn
    # the BN size the layout really gives on the GPUs it was written for (8 per machine)
    assert bn_size(cfg, gpus, per_machine) == bn
    assert cfg.SOLVER.MEGDET.SCHEDULE == schedule
    assert cfg.MODEL.WEIGHTS == R50
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert cfg.MODEL.RESNETS.NORM == ("FrozenBN" if bn == 0 else "CGBN")
    # paper: "When the BN size >= 32, the sublinear memory is applied"
    assert cfg.MEGDET.SUBLINEAR_MEMORY == (bn >= 32)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.MEGDET.REFERENCE_BATCH_SIZE == 16
    # a valid launch for that row (the data and weight checks need COCO and are not run)
    check_group_size(cfg.MODEL.CGBN.GROUP_SIZE, gpus, per_machine)
    check_norms(cfg)
    check_solver_config(cfg)


@pytest.mark.parametrize("row", TABLE2, ids=lambda r: f"b{r[0]}_halflr{r[1]}")
def test_table2_rows(row):
    batch, half_lr, _ = row
    cfg = load_yaml(os.path.join(MEGDET, _table2_file(batch, half_lr)))
    assert cfg.SOLVER.IMS_PER_BATCH == batch
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.FPN.NORM == ""
    assert bn_size(cfg, cfg.MEGDET.WRITTEN_FOR.NUM_GPUS, 8) == 0
    assert cfg.MEGDET.WRITTEN_FOR.NUM_GPUS * 2 == batch  # 2 images per GPU
    assert cfg.SOLVER.BASE_LR == (0.01 if half_lr else 0.02)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "LinearScalingWarmupLR"
    assert cfg.MODEL.WEIGHTS == R50 and cfg.SOLVER.MEGDET.SCHEDULE == "normal"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def setup_log():
    """Records of megdet_d2.engine.layout's logger (independent of propagation settings)."""
    logger = logging.getLogger("megdet_d2.engine.layout")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_start_up_warns_when_launched_on_other_gpus(setup_log):
    cfg = load_yaml(os.path.join(MEGDET, "faster_rcnn_R_50_FPN_b256_bn32_normal.yaml"))
    assert check_written_for(cfg, world_size=64, procs_per_machine=8) == {
        "NUM_GPUS": 64,
        "BN_SIZE": 32,
    }
    assert not [r for r in setup_log if r.levelno >= logging.WARNING]
    assert "256 = 64 processes x 4 images per process; BN size 32" in setup_log[0].getMessage()
    # the same file on 128 GPUs: 2 images per GPU, groups of 8 -> BN size 16 (another row)
    assert check_written_for(cfg, world_size=128, procs_per_machine=8)["BN_SIZE"] == 16
    warnings = [r.getMessage() for r in setup_log if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "WRITTEN_FOR.NUM_GPUS=64 but this launch gives 128" in warnings[0]
    assert "WRITTEN_FOR.BN_SIZE=32 but this launch gives 16" in warnings[1]
    with pytest.raises(
        ValueError,
        match=r"IMS_PER_BATCH=256 must be a positive multiple of the number of processes \(48\)",
    ):
        check_written_for(cfg, world_size=48, procs_per_machine=8)


def test_bn_size_of_other_norms():
    cfg = load_yaml(os.path.join(CONFIGS, "quickstart", "shapes_R18_FPN.yaml"))
    assert bn_size(cfg, 2, 2) == 4  # CGBN over one machine of 2 processes x 2 images
    cfg.MODEL.RESNETS.NORM = "BN"
    assert bn_size(cfg, 2, 2) == 2  # per process
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    assert bn_size(cfg, 4, 2) == 4  # all processes x 1 image
    cfg.MODEL.RESNETS.NORM = "CGBN"
    cfg.MODEL.CGBN.GROUP_SIZE = -1
    assert bn_size(cfg, 4, 2) == 4
    cfg.MODEL.RESNETS.NORM = "GN"
    assert bn_size(cfg, 4, 2) == 0


# ---------------------------------------------------------------------------------------------
# Key layout: MODEL.CGBN (the layer), SOLVER.MEGDET (LR), MEGDET (the rest of a run); the
# previous names still load for one release.
# ---------------------------------------------------------------------------------------------


def test_new_key_layout():
    from detectron2.config import get_cfg

    from megdet_d2 import add_megdet_config

    cfg = add_megdet_config(get_cfg())
    keys = ["MODEL.CGBN.GROUP_SIZE", "SOLVER.MEGDET.SCHEDULE", "MEGDET.SUBLINEAR_MEMORY",
            "MEGDET.LOG_PERIOD", "MEGDET.QUICKSTART.ROOT", "MEGDET.COCO_INSTANCES"]  # fmt: skip
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]


def test_deprecated_names_load_with_a_warning(tmp_path):
    from detectron2.config import get_cfg

    from megdet_d2 import ConfigError, add_megdet_config
    from megdet_d2.config import check_upgraded
    from megdet_d2.engine.config_file import merge_config

    path = tmp_path / "old.yaml"
    path.write_text("MODEL:\n  MEGDET:\n    SUBLINEAR_MEMORY: True\nDATASETS:\n  QUICKSTART:\n"
                    "    NUM_TRAIN: 16\n")  # fmt: skip
    cfg = add_megdet_config(get_cfg())
    with pytest.warns(FutureWarning) as records:
        sources = merge_config(cfg, str(path), ["LOG_PERIOD", "5"])
    messages = sorted(str(r.message) for r in records)
    assert len(messages) == 3 and all("is deprecated" in m for m in messages), messages
    assert any("LOG_PERIOD is deprecated" in m and "use MEGDET.LOG_PERIOD" in m for m in messages)
    assert cfg.MEGDET.LOG_PERIOD == 5 and cfg.MEGDET.SUBLINEAR_MEMORY is True
    assert cfg.MEGDET.QUICKSTART.NUM_TRAIN == 16
    assert cfg.LOG_PERIOD == 20 and "MEGDET.LOG_PERIOD" in sources  # old names reset, moved
    check_upgraded(cfg)  # nothing left under an old name

    both = add_megdet_config(get_cfg())
    with pytest.raises(ConfigError, match="LOG_PERIOD=5 .deprecated. and MEGDET.LOG_PERIOD=7"):
        merge_config(both, str(path), ["LOG_PERIOD", "5", "MEGDET.LOG_PERIOD", "7"])

    unmerged = add_megdet_config(get_cfg())  # a project merging by itself, without upgrading
    unmerged.merge_from_list(["LOG_PERIOD", "5"])
    with pytest.raises(ConfigError, match="LOG_PERIOD is deprecated and not read any more"):
        check_upgraded(unmerged)
