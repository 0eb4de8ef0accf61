"""No hangs: a killed process ends the whole job, an empty input on one process does not stall
CGBN's collectives, and a non-finite loss stops training with the iteration, losses and LR."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from megdet_d2.layers import CGBN
from megdet_d2.layers.groups import create_cgbn_groups
from tests.test_cgbn_models import _synthetic_batch, _tiny_cfg
from tests.utils.dist import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")


def _train_net(tmp_path, num_gpus, *opts):
    cmd = [sys.executable, "train_net.py", "--num-gpus", str(num_gpus), "--dist-url", "auto",
           "--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
           "MEGDET.QUICKSTART.NUM_TRAIN", "8", "DATASETS.TEST", "()", "SOLVER.STEPS", "()",
           "SOLVER.WARMUP_ITERS", "1", "MEGDET.LOG_PERIOD", "1",
           "OUTPUT_DIR", str(tmp_path / "out"),
           *opts]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # output to a file: a pipe that is read only at the end fills up (64 KB) and blocks the job
    with open(tmp_path / "train_net.log", "w") as log:
        proc = psutil.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.output = lambda: (tmp_path / "train_net.log").read_text()
    return proc


def _workers(launcher):
    """The spawned training processes (not multiprocessing's resource tracker)."""
    return [
        c
        for c in launcher.children(recursive=True)
        if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
    ]


def test_killing_one_process_ends_the_job_quickly(tmp_path):
    proc = _train_net(tmp_path, 2, "SOLVER.MAX_ITER", "1000", "MEGDET.DIST_TIMEOUT_S", "30")
    try:
        metrics = tmp_path / "out" / "metrics.json"
        deadline = time.monotonic() + 200
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.output()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _workers(proc)
        assert len(workers) == 2, workers
        workers[-1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_non_finite_loss_names_iteration_losses_and_lr(tmp_path):
    # an infinite loss weight (1e999 parses as inf) makes loss_box_reg inf at iteration 0
    inf = ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "1e999")
    proc = _train_net(tmp_path, 1, "SOLVER.MAX_ITER", "5", *inf)
    try:
        proc.wait(timeout=240)
        out = proc.output()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "FloatingPointError: Loss became infinite or NaN at iteration=0!" in out, out[-3000:]
    tail = out[out.rindex("FloatingPointError: Loss became") :]  # the one that ended it
    assert "'loss_box_reg': inf" in tail.splitlines()[1], tail[:2000]
    lr_line = re.fullmatch(
        r"lr = (\S+) at iteration 0: lower SOLVER.BASE_LR .*", tail.splitlines()[2]
    )
    assert lr_line and 0 < float(lr_line.group(1)) < 1, tail[:2000]


def _empty_on_rank_1(rank, world_size):
    """Two iterations; on rank 1 the first has images without annotations, the second also no
    proposals (zero ROIs reach the box head). Rank 0 has normal batches."""
    create_cgbn_groups(0)
    torch.manual_seed(0)
    cfg = _tiny_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    model = build_model(cfg).train()
    box_head_norms = [m for m in model.roi_heads.box_head.modules() if isinstance(m, CGBN)]
    results = []
    for iteration in range(2):
        batch = _synthetic_batch(seed=10 * iteration + rank)
        if rank == 1:
            for item in batch:
                item["instances"] = item["instances"][:0]  # no annotations
        with EventStorage():
            if rank == 0 or iteration == 0:
                losses = model(batch)
            else:
                images = model.preprocess_image(batch)
                features = model.backbone(images.tensor)
                empty = [
                    Instances(size, proposal_boxes=Boxes(torch.zeros(0, 4)),
                              objectness_logits=torch.zeros(0))
                    for size in images.image_sizes
                ]  # fmt: skip
                targets = [item["instances"] for item in batch]
                _, losses = model.roi_heads(images, features, empty, targets)
        sum(losses.values()).backward()
        results.append(
            {
                "losses": {k: float(v) for k, v in losses.items()},
                "running_mean": box_head_norms[0].running_mean.clone(),
            }
        )
    return {"box_head_cgbn": len(box_head_norms), "iterations": results}


def test_empty_input_on_one_process_completes_with_cgbn_in_the_box_head():
    r0, r1 = run_distributed(_empty_on_rank_1, world_size=2, timeout=180)
    assert r0["box_head_cgbn"] == r1["box_head_cgbn"] == 2
    for it0, it1 in zip(r0["iterations"], r1["iterations"]):
        for r in (it0, it1):
            assert all(math.isfinite(v) for v in r["losses"].values()), r["losses"]
        # CGBN statistics pooled over both ranks' ROIs: the same on both ranks, and moving
        torch.testing.assert_close(it0["running_mean"], it1["running_mean"])
    assert r1["iterations"][0]["losses"]["loss_box_reg"] == 0.0  # no foreground without GT
    assert r1["iterations"][1]["losses"]["loss_cls"] == 0.0  # zero ROIs: nothing to classify
    first, second = r0["iterations"][0]["running_mean"], r0["iterations"][1]["running_mean"]
    assert first.abs().sum() > 0 and not torch.equal(first, second)
