"""``launch``: detectron2's ``launch``, or -- under torchrun / SLURM / Kubernetes -- no spawning.

``torchrun`` (and launchers that set the same variables) starts every process itself and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. Detectron2's ``launch`` would spawn ``--num-gpus`` more processes from each
of them; here the process group is initialised from that environment (``env://``), detectron2's
per-machine group is made from ``LOCAL_WORLD_SIZE`` (CGBN's default group), and ``main_func``
runs in this process. Without those variables this is detectron2's ``launch``.
"""

import os

import torch
import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT", "launch", "launched_by_torchrun", "process_layout"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launched_by_torchrun():
    """Whether this process was started by torchrun (or a launcher setting its variables)."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def process_layout(num_gpus_per_machine, num_machines=1):
    """``(num_machines, processes per machine)`` of this launch: torchrun's, else the flags'."""
    if not launched_by_torchrun():
        return num_machines, num_gpus_per_machine
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if local < 1 or world % local != 0:
        raise ConfigError(
            f"LOCAL_WORLD_SIZE={local} must divide WORLD_SIZE={world}: start the same number "
            "of processes on every machine (torchrun --nproc-per-node)"
        )
    return world // local, local


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Same signature and behaviour as ``detectron2.engine.launch``; under torchrun the
    process-count arguments are ignored (the environment says them) and nothing is spawned."""
    if not launched_by_torchrun():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    num_machines, local_world_size = process_layout(num_gpus_per_machine, num_machines)
    if num_machines * local_world_size > 1:
        has_gpu = torch.cuda.is_available()
        if has_gpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(
            backend="NCCL" if has_gpu else "GLOO", init_method="env://", timeout=timeout
        )
        comm.create_local_process_group(local_world_size)
        comm.synchronize()
    result = main_func(*args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
