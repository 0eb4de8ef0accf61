"""Every process group of a run, made with the run's timeout (``MEGDET.DIST_TIMEOUT_S``).

torch gives each group its own timeout, and ``dist.new_group`` without one gets torch's
default (30 min for gloo), not the world group's. Detectron2 makes two groups that way: the
per-machine group (``comm.create_local_process_group``, CGBN's default group) and, under NCCL,
the gloo group of ``comm.all_gather`` / ``gather``. A process waiting there for a frozen or dead
peer would wait 30 minutes, whatever the run's timeout. :func:`init_process_groups` makes all
three with the timeout; CGBN's own groups get it through ``create_cgbn_groups(..., timeout=)``.

NCCL runs collectives asynchronously: a hung kernel or a stalled peer never returns control to
Python, so an exception cannot end the process; NCCL's watchdog thread must. Set here unless the
user set them (torchrun sets the first too):

* ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: the watchdog ends the process once a collective exceeds
  the group's timeout, wherever the main thread is blocked (``TORCH_NCCL_BLOCKING_WAIT`` would
  only raise in a thread waiting on the collective, and disables the watchdog);
* ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=30`` (torch: 480): with a kernel that never ends, the
  watchdog detects the timeout but then blocks in its teardown, and only this monitor ends the
  process. Seen on an H200 (torch 2.11, timeout 10 s, a GPU kernel that never ends ahead of an
  all-reduce): with torch's default the process was still alive 90 s later; with these two
  settings it ended (SIGABRT) 47 s after the all-reduce was issued.
"""

import os

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["create_local_process_group", "init_process_groups"]

_NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "30"}


def init_process_groups(init_method, world_size, rank, local_rank, procs_per_machine, timeout):
    """Join the run as detectron2's ``launch`` does (NCCL with a GPU, else gloo; per-machine
    group; a barrier), every group with ``timeout`` (a ``timedelta``)."""
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        for name, value in _NCCL_ENV.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="NCCL" if has_gpu else "GLOO",
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=timeout,
    )
    create_local_process_group(procs_per_machine, timeout)
    if dist.get_backend() != dist.Backend.GLOO:
        # detectron2 makes this group lazily in the first comm.all_gather (shared_random_seed,
        # when the data loader is built) with torch's default timeout; made here with ours.
        gloo = dist.new_group(backend="gloo", timeout=timeout)
        comm._get_global_gloo_group = lambda: gloo
    comm.synchronize()


def create_local_process_group(procs_per_machine, timeout):
    """``comm.create_local_process_group`` with ``timeout``: the group of this machine's
    ``procs_per_machine`` consecutive ranks, as ``comm.get_local_process_group()``."""
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("detectron2's per-machine process group already exists")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if procs_per_machine < 1 or world_size % procs_per_machine != 0:
        raise ValueError(f"{procs_per_machine} processes per machine do not divide {world_size}")
    for start in range(0, world_size, procs_per_machine):  # every rank makes every group
        group = dist.new_group(list(range(start, start + procs_per_machine)), timeout=timeout)
        if start <= rank < start + procs_per_machine:
            comm._LOCAL_PROCESS_GROUP = group
