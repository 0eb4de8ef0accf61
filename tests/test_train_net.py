"""End to end: ``train_net.py`` as a user runs it, 2 CPU processes (gloo), real COCO json."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")

# The "normal" preset on 8 training images at batch 4: 2 iterations per epoch, decays at
# epochs 8 and 10 -> iterations 16 and 20, 11 epochs -> 22 iterations. With a reference batch
# of 2, k = 2: the LR warms up from r to 2r over 4 iterations.
R, K, WARMUP, STEPS, MAX_ITER = 0.01, 2, 4, (16, 20), 22


def expected_lr(it):
    if it < WARMUP:
        return R + (K * R - R) * it / WARMUP
    return K * R * 0.1 ** sum(it >= s for s in STEPS)


def train_net(*args, expect_rc=0, env=None, timeout=400):
    """Run train_net.py; fail with the end of its log if it exits with another status."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--dist-url", "auto", *args]
    env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert (
        proc.returncode == expect_rc
    ), f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    return proc


def tiny_opts(tmp_path, *extra):
    """A few iterations on a few images of the quickstart data, logged every iteration."""
    return [
        "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", "8",
        "MEGDET.QUICKSTART.NUM_VAL", "4",
        "SOLVER.BASE_LR", str(R),
        "SOLVER.MEGDET.REFERENCE_BATCH_SIZE", "2",
        "SOLVER.MEGDET.SCHEDULE", "normal",
        "SOLVER.MEGDET.EVAL_PERIOD_EPOCHS", "0",  # evaluate once, at the end
        "SOLVER.MEGDET.CHECKPOINT_PERIOD_EPOCHS", "5",
        "SOLVER.WARMUP_ITERS", str(WARMUP),
        "MEGDET.LOG_PERIOD", "1",
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
    proc = train_net(
        "--num-gpus", "2", "--config-file", CONFIG,
        *tiny_opts(tmp_path, "OUTPUT_DIR", str(out)),
    )  # fmt: skip
    return tmp_path, out, proc.stdout + proc.stderr


def test_training_writes_checkpoints_and_finite_ap_ar(trained):
    _, out, log = trained
    assert (out / "model_final.pth").is_file() and (out / "model_0000009.pth").is_file()
    final = [m for m in read_metrics(out / "metrics.json") if "bbox/AP" in m][-1]
    assert math.isfinite(final["bbox/AP"]) and math.isfinite(final["bbox/AR"])
    assert "BN size = 2 processes x 2 images per process = 4" in log
    # the preset's numbers reach the console, once a logger exists
    assert "Schedule preset 'normal': 8 images per epoch / SOLVER.IMS_PER_BATCH 4 = 2 " in log


def test_lr_follows_linear_scaling_warmup_and_the_preset(trained):
    _, out, _ = trained
    logged = [(m["iteration"], m["lr"]) for m in read_metrics(out / "metrics.json") if "lr" in m]
    assert [it for it, _ in logged] == list(range(MAX_ITER))
    lrs = np.array([lr for _, lr in logged])
    assert np.allclose(lrs, [expected_lr(it) for it in range(MAX_ITER)], rtol=1e-6, atol=0)
    assert lrs[0] == pytest.approx(R) and lrs.max() == pytest.approx(K * R)
    with open(out / "config.yaml") as f:
        dumped = f.read()
    assert "MAX_ITER: 22" in dumped and "- 16\n  - 20" in dumped


def test_resume_after_a_kill_continues_with_the_same_iteration_lr_and_losses(trained):
    """SIGKILL the whole job right after its first checkpoint, then ``--resume`` it."""
    tmp_path, out, _ = trained
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--dist-url", "auto",
           "--num-gpus", "2", "--config-file", CONFIG,
           *tiny_opts(tmp_path, "OUTPUT_DIR", str(killed))]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    last = killed / "last_checkpoint"
    try:
        deadline = time.monotonic() + 300
        while not (last.exists() and last.read_text() == "model_0000009.pth"):
            assert proc.poll() is None, f"training exited ({proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-training
        proc.wait()
    assert not (killed / "model_final.pth").exists()
    proc = train_net(
        "--num-gpus", "2", "--resume", "--config-file", CONFIG,
        *tiny_opts(tmp_path, "OUTPUT_DIR", str(killed)),
    )  # fmt: skip
    assert "Starting training from iteration 10" in proc.stdout + proc.stderr
    full = {m["iteration"]: m for m in read_metrics(out / "metrics.json") if "lr" in m}
    # Each iteration once: what the killed run logged past its checkpoint was dropped (the kill
    # may also land before the writer logged iteration 9, which runs after the checkpointer).
    logged = [m["iteration"] for m in read_metrics(killed / "metrics.json") if "lr" in m]
    assert len(logged) == len(set(logged)) and logged == sorted(logged), logged
    resumed = [m for m in read_metrics(killed / "metrics.json") if m["iteration"] >= 10]
    again = {m["iteration"]: m for m in resumed if "lr" in m}
    assert sorted(again) == list(range(10, MAX_ITER))
    assert all(again[it]["lr"] == full[it]["lr"] for it in again)
    # Same batches and augmentations (the loader resumes its stream at iteration 10), same
    # random draws (seeded per iteration) and same optimizer state: every loss equals the
    # uninterrupted run's, bit for bit (tests/test_resume_exact.py: with grouping and workers).
    losses = [k for k in full[10] if k.startswith("loss_")] + ["total_loss"]
    assert len(losses) >= 5, losses
    for it in range(10, MAX_ITER):
        for k in losses:
            assert again[it][k] == full[it][k], (it, k)


def test_eval_only_on_the_checkpoint_reproduces_the_training_eval(trained):
    tmp_path, out, _ = trained
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
    # CGBN keeps running statistics identical on both processes, so the checkpoint (rank 0's)
    # scores exactly what the 2-process evaluation at the end of training scored.
    final = [m for m in read_metrics(out / "metrics.json") if "bbox/AP" in m][-1]
    assert bbox["AP"] == pytest.approx(final["bbox/AP"]) and bbox["AR"] == pytest.approx(
        final["bbox/AR"]
    )


def test_bad_cgbn_group_size_fails_before_spawning_with_one_line(tmp_path):
    proc = train_net(
        "--num-gpus", "2", "--config-file", CONFIG,
        *tiny_opts(tmp_path, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.CGBN.GROUP_SIZE", "3"),
        expect_rc=2, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Config error: MODEL.CGBN.GROUP_SIZE=3 must divide the world size 2")
    assert not (tmp_path / "out").exists()


def test_builtin_coco_dataset_works_unchanged(tmp_path):
    """``coco_2017_val`` under $DETECTRON2_DATASETS, as detectron2 registers it."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from megdet_d2.data import VAL_NAME, prepare_quickstart_data

    json_file, image_root = prepare_quickstart_data(str(tmp_path / "src"), 4, 4, 128, 0)[VAL_NAME]
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copytree(image_root, coco / "val2017")
    with open(json_file) as f:
        data = json.load(f)  # category ids 1-3 are COCO's person, bicycle, car
    data["categories"] = [
        {"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]
    ]
    with open(coco / "annotations" / "instances_val2017.json", "w") as f:
        json.dump(data, f)
    out = tmp_path / "out"
    train_net(
        "--num-gpus", "1", "--eval-only", "--config-file", CONFIG,
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "('coco_2017_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "OUTPUT_DIR", str(out),
        env={"DETECTRON2_DATASETS": str(tmp_path)},
    )  # fmt: skip
    with open(out / "inference" / "coco_2017_val" / "coco_metrics.json") as f:
        bbox = json.load(f)["bbox"]
    assert math.isfinite(bbox["AP"]) and math.isfinite(bbox["AR"])
