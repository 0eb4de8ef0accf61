"""The spawn-N-gloo-processes helper itself: results, failure propagation, timeouts."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.utils.dist import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    from detectron2.utils import comm

    return t.item(), comm.get_local_size(), comm.get_local_rank()


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()


def _hang(rank, world_size):
    if rank == 0:
        time.sleep(600)
    dist.barrier()


def test_results_come_back_per_rank():
    results = run_distributed(_all_reduce_rank, world_size=2)
    assert [r[0] for r in results] == [1.0, 1.0]
    assert [r[1:] for r in results] == [(2, 0), (2, 1)]


def test_two_machines_layout():
    results = run_distributed(_all_reduce_rank, world_size=4, procs_per_machine=2)
    assert [r[1:] for r in results] == [(2, 0), (2, 1), (2, 0), (2, 1)]


def test_child_failure_propagates_with_traceback():
    with pytest.raises(ChildProcessError, match=r"(?s)^[^\n]*\n-- rank 1:.*boom from rank 1"):
        run_distributed(_fail_on_rank_1, world_size=2, timeout=60)


def test_hang_is_killed():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_distributed(_hang, world_size=2, timeout=8)
    assert time.monotonic() - start < 60
