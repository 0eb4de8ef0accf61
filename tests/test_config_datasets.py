"""The user's own COCO-format data named in the config (``MEGDET.COCO_INSTANCES``): registered
in every process, checked at start-up, trained and evaluated end to end by ``train_net.py``."""

import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from megdet_d2 import ConfigError, add_megdet_config
from megdet_d2.data import prepare_quickstart_data, register_config_datasets
from tests.test_train_net import CONFIG, train_net


def _cfg(entries):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.MEGDET.COCO_INSTANCES = entries
    return cfg


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """A COCO json + images written by the quickstart generator: 8 train, 4 val images."""
    root = tmp_path_factory.mktemp("mydata")
    paths = prepare_quickstart_data(str(root), 8, 4, 128, 0)
    (train_json, train_images), (val_json, val_images) = paths.values()
    return {"train": [train_json, train_images], "val": [val_json, val_images]}


def test_registers_each_entry_once(coco_files):
    cfg = _cfg([["cfgds_train", *coco_files["train"]], ["cfgds_val", *coco_files["val"]]])
    try:
        assert register_config_datasets(cfg) == ["cfgds_train", "cfgds_val"]
        assert register_config_datasets(cfg) == ["cfgds_train", "cfgds_val"]  # idempotent
        dicts = DatasetCatalog.get("cfgds_train")
        assert len(dicts) == 8 and MetadataCatalog.get("cfgds_train").thing_classes
    finally:
        for name in ("cfgds_train", "cfgds_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([["only_two", "a.json"]], r"MEGDET.COCO_INSTANCES\[0\]=\['only_two', 'a.json'\] is "
                                   r"not a \[name, json file, image folder\] triple"),
        ([["x", "", "imgs"]], r"MEGDET.COCO_INSTANCES\[0\]=.* triple of non-empty strings"),
        ([["x", "a.json", "i"], ["x", "b.json", "i"]], "names 'x' twice"),
        ([["coco_2017_train", "mine.json", "imgs"]], "'coco_2017_train' is already registered"),
    ],
)  # fmt: skip
def test_bad_entries_are_one_line_errors(entries, message):
    with pytest.raises(ConfigError, match=message) as info:
        register_config_datasets(_cfg(entries))
    assert "\n" not in str(info.value)


def _opts(tmp_path, coco_files, train_json=None):
    entries = [["mine_train", train_json or coco_files["train"][0], coco_files["train"][1]],
               ["mine_val", *coco_files["val"]]]  # fmt: skip
    return [
        "--num-gpus", "2", "--config-file", CONFIG,
        "MEGDET.COCO_INSTANCES", json.dumps(entries),
        "DATASETS.TRAIN", '("mine_train",)', "DATASETS.TEST", '("mine_val",)',
        "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(4,)", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.CHECKPOINT_PERIOD", "100", "MEGDET.LOG_PERIOD", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip


def test_train_and_evaluate_on_config_datasets(tmp_path, coco_files):
    proc = train_net(*_opts(tmp_path, coco_files))
    out = proc.stdout + proc.stderr
    assert "bbox: mmAP = " in out, out[-3000:]
    metrics = json.loads((tmp_path / "out" / "inference" / "mine_val" / "coco_metrics.json")
                         .read_text())  # fmt: skip
    assert "AP" in metrics["bbox"] and "AR" in metrics["bbox"]
    assert (tmp_path / "out" / "model_final.pth").exists()


def test_missing_json_fails_at_start_up_with_one_line(tmp_path, coco_files):
    proc = train_net(*_opts(tmp_path, coco_files, "/nonexistent/train.json"), expect_rc=2)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Config error:")]
    assert len(lines) == 1 and "/nonexistent/train.json" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
