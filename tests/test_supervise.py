"""supervise.py: a failed worker waits once before its traceback, however many reporters
(detectron2's train-loop log, run_worker) call it; a failed job leaves no process behind, not
even one its workers started."""

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch.distributed as dist

from megdet_d2.engine import JobFailed, launch, supervise

CODE = """
import time
from megdet_d2.engine.supervise import pause_before_traceback
times = []
for _ in range(2):
    start = time.monotonic()
    pause_before_traceback()
    times.append(time.monotonic() - start)
print(*times)
"""


def test_pause_before_traceback_waits_once_per_process():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    first, second = map(float, out.stdout.split())
    assert first >= supervise._PEER_FAILURE_S and second < 0.5 * supervise._PEER_FAILURE_S


def _sleep_forever():
    time.sleep(600)


def _start_a_child_then_fail(out_dir):
    """``main_func`` of ``launch``: each rank starts a child process that never checks on its
    parent (as a data-loader worker still starting up); rank 0 then fails."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_sleep_forever, daemon=False)
    child.start()
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"{rank}.pid"), "w") as f:
        f.write(str(child.pid))
    dist.barrier()  # both children started
    if rank == 0:
        raise RuntimeError("rank 0 fails")
    time.sleep(600)


def test_a_failed_job_leaves_no_process_its_workers_started(tmp_path):
    """The failing worker kills its children before it exits; the launcher kills the other
    worker together with its children. Otherwise they would outlive the job (a child re-parented
    before torch's data-loader watchdog starts never notices) and hold its output pipes open."""
    with pytest.raises(JobFailed, match="rank 0 failed: RuntimeError: rank 0 fails"):
        launch(_start_a_child_then_fail, 2, args=(str(tmp_path),))
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), pids


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
