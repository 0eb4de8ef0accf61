"""MegDetCOCOEvaluator: detectron2's COCO AP plus mmAR, written to the output folder."""

import json
import logging
import math
from collections import Counter

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from megdet_d2 import add_megdet_config
from megdet_d2.data import VAL_NAME, register_quickstart_datasets
from megdet_d2.evaluation import MegDetCOCOEvaluator

RECALL_KEYS = ("AR@1", "AR@10", "AR", "ARs", "ARm", "ARl")


def _val_dicts(tmp_path):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.DATASETS.TEST = (VAL_NAME,)
    cfg.MEGDET.QUICKSTART.ROOT = str(tmp_path / "data")
    cfg.MEGDET.QUICKSTART.NUM_VAL = 6
    register_quickstart_datasets(cfg)
    return DatasetCatalog.get(VAL_NAME)


def _run(evaluator, dicts, keep):
    evaluator.reset()
    for d in dicts:
        objs = d["annotations"][:keep]
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(o["bbox"], o["bbox_mode"], BoxMode.XYXY_ABS) for o in objs]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(objs))
        inst.pred_classes = torch.tensor([o["category_id"] for o in objs], dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()


def test_perfect_detections_give_full_ap_and_ar_and_a_metrics_file(tmp_path):
    dicts = _val_dicts(tmp_path)
    out = tmp_path / "inference"
    evaluator = MegDetCOCOEvaluator(VAL_NAME, output_dir=str(out), distributed=False)
    results = _run(evaluator, dicts, keep=None)["bbox"]
    assert math.isclose(results["AP"], 100.0) and math.isclose(results["AR"], 100.0)
    assert math.isclose(results["AR@10"], 100.0)
    with open(out / "coco_metrics.json") as f:
        assert json.load(f)["bbox"]["AR"] == results["AR"]


def test_missing_detections_lower_recall(tmp_path):
    dicts = _val_dicts(tmp_path)
    evaluator = MegDetCOCOEvaluator(VAL_NAME, distributed=False)
    results = _run(evaluator, dicts, keep=1)["bbox"]
    # COCO recall is averaged over categories: per category, found / present (exact boxes).
    found, present = Counter(), Counter()
    for d in dicts:
        present.update(o["category_id"] for o in d["annotations"])
        found.update(o["category_id"] for o in d["annotations"][:1])
    assert sum(present.values()) > len(dicts)  # some images hold several objects
    expected = 100.0 * sum(found[c] / present[c] for c in present) / len(present)
    assert expected < 100.0
    assert math.isclose(results["AR"], expected, rel_tol=1e-6)
    assert set(RECALL_KEYS) <= set(results)


def test_faster_coco_eval_backend_matches_pycocotools(tmp_path):
    """The fast backend (used when detectron2's C++ one is missing) gives identical numbers."""
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is an optional backend")
    dicts = _val_dicts(tmp_path)
    fast = MegDetCOCOEvaluator(VAL_NAME, distributed=False)
    official = MegDetCOCOEvaluator(VAL_NAME, distributed=False, use_fast_impl=False)
    assert fast._use_fast_impl and not official._use_fast_impl
    a, b = _run(fast, dicts, keep=2)["bbox"], _run(official, dicts, keep=2)["bbox"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9, nan_ok=True), key


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _reject_nan(name):
    raise ValueError(f"{name} is not JSON")


def test_no_detections_write_null_and_say_so(tmp_path):
    """A model that detects nothing: strict JSON (null, not NaN) and a line saying why."""
    dicts = _val_dicts(tmp_path)
    out = tmp_path / "inference"
    evaluator = MegDetCOCOEvaluator(VAL_NAME, output_dir=str(out), distributed=False)
    records, level = _Records(), evaluator._logger.level
    evaluator._logger.addHandler(records)
    evaluator._logger.setLevel(logging.INFO)
    try:
        results = _run(evaluator, dicts, keep=0)["bbox"]
    finally:
        evaluator._logger.removeHandler(records)
        evaluator._logger.setLevel(level)
    assert math.isnan(results["AP"]) and math.isnan(results["AR"])
    with open(out / "coco_metrics.json") as f:
        bbox = json.load(f, parse_constant=_reject_nan)["bbox"]
    assert bbox["AP"] is None and bbox["AR"] is None and bbox["AR@10"] is None
    assert f"bbox: no detections on {VAL_NAME}, so mmAP and mmAR are undefined" in "".join(
        records.lines
    )


def test_no_ground_truth_in_the_evaluated_images_is_a_config_error(tmp_path):
    """Detections but only crowd ground truth: COCOeval's -1 everywhere would print a table of
    nan with status 0; instead one line says why (train_net.py exits with status 2)."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from megdet_d2 import ConfigError

    _val_dicts(tmp_path)
    meta = MetadataCatalog.get(VAL_NAME)
    with open(meta.json_file) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    crowd_json = tmp_path / "crowd_only.json"
    crowd_json.write_text(json.dumps(data))
    name = "megdet_test_crowd_only"
    register_coco_instances(name, {}, str(crowd_json), meta.image_root)
    try:
        dicts = DatasetCatalog.get(name)
        evaluator = MegDetCOCOEvaluator(name, output_dir=str(tmp_path / "out"), distributed=False)
        with pytest.raises(ConfigError) as error:
            _run(evaluator, dicts, keep=None)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert str(error.value).startswith(
        f"DATASETS.TEST {name!r}: COCO bbox evaluation found no (non-crowd) ground truth in "
        f"the {len(dicts)} evaluated image(s)"
    )
    assert not (tmp_path / "out" / "coco_metrics.json").exists()
