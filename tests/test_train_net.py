"""End to end: ``train_net.py`` as a user runs it, 2 CPU processes (gloo), real COCO json."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")


def train_net(*args, timeout=400):
    """Run train_net.py; fail with the end of its log if it exits non-zero."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--dist-url", "auto", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert (
        proc.returncode == 0
    ), f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    return proc


def tiny_opts(tmp_path, *extra):
    """A few iterations on a few images of the quickstart data."""
    return [
        "DATASETS.QUICKSTART.ROOT", str(tmp_path / "data"),
        "DATASETS.QUICKSTART.NUM_TRAIN", "8",
        "DATASETS.QUICKSTART.NUM_VAL", "4",
        "SOLVER.MAX_ITER", "6",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "(4,)",
        "SOLVER.CHECKPOINT_PERIOD", "3",
        "LOG_PERIOD", "1",
        # an untrained model scores low: keep every detection so AP and AR are defined
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        *extra,
    ]  # fmt: skip


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    out = tmp_path / "out"
    train_net(
        "--num-gpus", "2", "--config-file", CONFIG,
        *tiny_opts(tmp_path, "OUTPUT_DIR", str(out)),
    )  # fmt: skip
    return tmp_path, out


def test_training_writes_checkpoint_and_finite_ap_ar(trained):
    _, out = trained
    assert (out / "model_final.pth").is_file()
    metrics = read_metrics(out / "metrics.json")
    assert [m["iteration"] for m in metrics if "lr" in m] == list(range(6))
    final = [m for m in metrics if "bbox/AP" in m][-1]
    assert math.isfinite(final["bbox/AP"]) and math.isfinite(final["bbox/AR"])


def test_eval_only_on_the_checkpoint_writes_finite_ap_ar(trained):
    tmp_path, out = trained
    eval_out = tmp_path / "eval"
    proc = train_net(
        "--num-gpus", "2", "--eval-only", "--config-file", CONFIG,
        *tiny_opts(tmp_path, "OUTPUT_DIR", str(eval_out)),
        "MODEL.WEIGHTS", str(out / "model_final.pth"),
    )  # fmt: skip
    assert "mmAP = " in proc.stdout + proc.stderr and "mmAR = " in proc.stdout + proc.stderr
    with open(eval_out / "inference" / "megdet_shapes_val" / "coco_metrics.json") as f:
        bbox = json.load(f)["bbox"]
    for key in ("AP", "AP50", "AR", "AR@1", "AR@10"):
        assert math.isfinite(bbox[key]), key
