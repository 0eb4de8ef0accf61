"""supervise.py, with real spawned processes (gloo on 127.0.0.1): the root cause of a failed job
is the earliest worker report, whichever worker the launcher sees end first; a config error is
reported as its one line; a failed job leaves no process behind, not even one its workers
started."""

import logging
import os
import time

import psutil
import pytest
import torch.distributed as dist

from megdet_d2 import ConfigError
from megdet_d2.engine import JobFailed, launch


class _SlowClose(logging.Handler):
    """A log handler whose close (run by the failing worker's ``logging.shutdown``, after its
    report is written) marks a file and then takes ``seconds``."""

    def __init__(self, marker, seconds):
        super().__init__()
        self.marker, self.seconds = marker, seconds

    def emit(self, record):
        pass

    def close(self):
        open(self.marker, "w").close()
        time.sleep(self.seconds)
        super().close()


def _fail_first_exit_last(out_dir):
    """Rank 1 fails first but ends 2 s after its report; rank 0 fails once rank 1 has reported,
    and ends at once: the launcher sees rank 0 end first."""
    marker = os.path.join(out_dir, "rank1_reported")
    if dist.get_rank() == 1:
        logging.getLogger("megdet_d2.test").addHandler(_SlowClose(marker, 2.0))
        raise ValueError("the root cause")
    while not os.path.exists(marker):
        time.sleep(0.05)
    raise RuntimeError("a consequence")


def test_the_root_cause_is_the_earliest_report_not_the_first_process_to_end(tmp_path):
    with pytest.raises(JobFailed) as failed:
        launch(_fail_first_exit_last, 2, args=(str(tmp_path),))
    assert str(failed.value) == "rank 1 failed: ValueError: the root cause", failed.value
    assert failed.value.exit_code == 1
    assert failed.value.last_line == "Job failed: rank 1 failed: ValueError: the root cause"
    assert failed.value.traceback.startswith("Traceback (most recent call last):")
    assert failed.value.traceback.rstrip().endswith("ValueError: the root cause")


def _config_error_on_rank_1():
    """Rank 1: a fault only it sees; rank 0 then fails in a collective."""
    if dist.get_rank() == 1:
        raise ConfigError("image 'x.png' cannot be used; replace the file")
    dist.barrier()
    dist.barrier()


def test_a_worker_config_error_is_the_last_line_as_is():
    with pytest.raises(JobFailed) as failed:
        launch(_config_error_on_rank_1, 2)
    assert failed.value.exit_code == 2
    assert failed.value.last_line == "Config error: image 'x.png' cannot be used; replace the file"
    assert failed.value.traceback == ""


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
    """The failing worker kills its children before it exits; torch's join stops the other
    worker (SIGTERM), whose children the launcher adopts and kills. Otherwise they would
    outlive the job (a child re-parented before torch's data-loader watchdog starts never
    notices) and hold its output pipes open."""
    with pytest.raises(JobFailed, match="rank 0 failed: RuntimeError: rank 0 fails"):
        launch(_start_a_child_then_fail, 2, args=(str(tmp_path),))
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    assert not any(_alive(p) for p in pids), pids  # launch returns once they are gone


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
