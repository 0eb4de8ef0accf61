"""Scale-out on the existing engines, with real processes on 127.0.0.1 (gloo):

* two "machines" x 2 processes with detectron2's ``--num-machines/--machine-rank/--dist-url``:
  CGBN's default group is each machine's two processes;
* ``torchrun --nproc-per-node 2 train_net.py``: no second spawn, per-machine group from
  ``LOCAL_WORLD_SIZE``;
* a finished worker destroys its process groups before interpreter teardown.

A few iterations on 8 images each: these prove the launch paths, not the training.
"""

import atexit
import os
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from megdet_d2.engine.launch import launch, launched_by_torchrun, process_layout
from megdet_d2.layers.groups import create_cgbn_groups
from tests.utils.dist import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
TIMEOUT_S = 240


def few_iterations(tmp_path, batch, iters=3):
    """``iters`` iterations, no preset, no evaluation, no checkpoint but the final one."""
    return [
        "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN", "8",
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "1",
        "MEGDET.LOG_PERIOD", "1",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip


def run_all(cmds, timeout=TIMEOUT_S):
    """Start the commands together; wait for all (kill all at the deadline); return outputs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # so a hung launch can be killed with its workers
        )
        for cmd in cmds
    ]  # fmt: skip
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs], outputs


def test_process_layout_from_flags_or_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun() and process_layout(8, 2) == (2, 8)
    env = {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launched_by_torchrun() and process_layout(1, 1) == (2, 3)  # flags ignored
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=4 must divide WORLD_SIZE=6"):
        process_layout(1, 1)


def test_two_machines_with_detectron2_flags(tmp_path):
    dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    cmds = [
        [sys.executable, "train_net.py", "--num-gpus", "2", "--num-machines", "2",
         "--machine-rank", str(rank), "--dist-url", dist_url, "--config-file", CONFIG,
         *few_iterations(tmp_path, batch=4)]
        for rank in (0, 1)
    ]  # fmt: skip
    codes, (log0, log1) = run_all(cmds)
    assert codes == [0, 0], f"{log0[-3000:]}\n--- machine 1:\n{log1[-3000:]}"
    assert "CGBN groups (MODEL.CGBN.GROUP_SIZE=0): [[0, 1], [2, 3]]" in log0
    assert "BN size = 2 processes x 1 images per process = 2" in log0
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_torchrun_runs_without_spawning_again(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()),
           "train_net.py", "--config-file", CONFIG, *few_iterations(tmp_path, batch=4)]  # fmt: skip
    (code,), (log,) = run_all([cmd])
    assert code == 0, log[-5000:]
    assert "Mini-batch 4 = 2 processes x 2 images per process" in log
    assert "CGBN groups (MODEL.CGBN.GROUP_SIZE=0): [[0, 1]]" in log
    assert "BN size = 2 processes x 2 images per process = 4" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()
    # two ranks trained (not 2 x --num-gpus spawned ones): one log file per rank
    logs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("log.txt"))
    assert logs == ["log.txt", "log.txt.rank1"], logs


def _report_groups_at_exit(out_dir):
    """``main_func`` of ``launch``: at interpreter exit, write whether a process group is left
    (left to teardown, a backend's threads can abort a finished worker)."""
    create_cgbn_groups(2)
    rank = dist.get_rank()

    def report():
        with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
            f.write(str(dist.is_initialized()))

    atexit.register(report)


def test_launched_workers_destroy_their_process_groups_before_exit(tmp_path):
    launch(_report_groups_at_exit, 2, args=(str(tmp_path),))
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["False", "False"]
