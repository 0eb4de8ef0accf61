"""CPU threads per process: a machine's cores split among its processes."""

import os

import torch
from detectron2.utils import comm

__all__ = ["set_cpu_threads"]


def set_cpu_threads(cfg):
    """Split the machine's cores among the CPU processes of this machine (as torchrun does).

    Every process otherwise starts one thread per core, and N processes oversubscribe N-fold.
    An explicit ``OMP_NUM_THREADS`` wins.
    """
    procs = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
