"""``--resume`` is bit-exact with the paper configs' loader settings: aspect-ratio grouping over
images of both orientations, ``DATALOADER.NUM_WORKERS 2``, random resize and flip; the job is
SIGKILLed mid-epoch, after a checkpoint, and resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from megdet_d2.utils import read_config, read_metrics
from tests.test_train_net import CONFIG, REPO, train_net

MAX_ITER, CHECKPOINT_AT = 12, 4  # 11 images, batch 4: iteration 4 ends mid-epoch
TIMING = ("time", "data_time", "eta_seconds", "rank_data_time")


def _opts(tmp_path, out):
    return [
        "--num-gpus", "2", "--config-file", CONFIG,
        "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", "11",
        "MEGDET.QUICKSTART.IMAGE_SIZE", "96",
        "MEGDET.QUICKSTART.ASPECT_RATIOS", "[0.75, 1.5]",  # portrait and landscape
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "2",
        "DATALOADER.ASPECT_RATIO_GROUPING", "True",
        "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)",  # random size choice (and detectron2's flip)
        "INPUT.MAX_SIZE_TRAIN", "96",
        "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.STEPS", "(8,)",
        "SOLVER.WARMUP_ITERS", "3",
        "SOLVER.CHECKPOINT_PERIOD", str(CHECKPOINT_AT + 1),
        "MEGDET.LOG_PERIOD", "1",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip


def _complete_lines(path):
    """Lines a writer has finished (the last one may be half written while we read)."""
    return path.read_text().count("\n") if path.exists() else 0


def _kill_after_checkpoint(tmp_path, out, logged, *extra):
    """Start training, SIGKILL its process group once ``logged`` iterations are in
    metrics.json, after the checkpoint of iteration ``CHECKPOINT_AT``."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--dist-url", "auto",
           *_opts(tmp_path, out), *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = f"model_{CHECKPOINT_AT:07d}.pth"
    try:
        deadline = time.monotonic() + 300
        while not (
            (out / "last_checkpoint").exists()
            and (out / "last_checkpoint").read_text() == checkpoint
            and _complete_lines(out / "metrics.json") >= logged
        ):
            assert proc.poll() is None, f"training exited ({proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "not killed within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # launcher, both trainers and their loader workers
        proc.wait()
    assert not (out / "model_final.pth").exists()


def test_resume_after_a_kill_is_bit_exact_with_grouping_workers_and_augmentation(tmp_path):
    # SEED -1 as in the paper configs: the killed run records the seed it drew in config.yaml,
    # --resume reuses it; the uninterrupted run is given that seed explicitly
    killed = tmp_path / "killed"
    _kill_after_checkpoint(tmp_path, killed, CHECKPOINT_AT + 3, "SEED", "-1")
    seed = read_config(killed)["SEED"]
    assert isinstance(seed, int) and seed >= 0, seed
    full = tmp_path / "full"
    train_net(*_opts(tmp_path, full), "SEED", str(seed))
    proc = train_net("--resume", *_opts(tmp_path, killed), "SEED", "-1")
    assert f"Starting training from iteration {CHECKPOINT_AT + 1}" in proc.stdout + proc.stderr

    # both orientations, so the aspect-ratio grouping holds images back
    (json_file,) = (tmp_path / "data").glob("*/train.json")
    sizes = [(im["width"], im["height"]) for im in json.loads(json_file.read_text())["images"]]
    assert {w > h for w, h in sizes} == {True, False}, sizes

    # every iteration logged once (the killed run's records past its checkpoint were dropped
    # by the resumed run), and every logged value (losses, LR, sample statistics, accuracies)
    # equals the uninterrupted run's
    with open(killed / "metrics.json") as f:
        logged = [json.loads(line)["iteration"] for line in f]
    assert logged == list(range(MAX_ITER)), logged
    expected, got = read_metrics(full), read_metrics(killed)
    assert (
        [m["iteration"] for m in got] == [m["iteration"] for m in expected] == list(range(MAX_ITER))
    )
    assert len([k for k in expected[-1] if k.startswith("loss_")]) >= 4
    for a, b in zip(got, expected):
        a, b = ({k: v for k, v in m.items() if k not in TIMING} for m in (a, b))
        assert a == b, a["iteration"]

    weights = [
        torch.load(d / "model_final.pth", weights_only=False)["model"] for d in (killed, full)
    ]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 100
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert differ == [], f"{len(differ)} of {len(weights[0])} tensors differ: {differ[:5]}"
