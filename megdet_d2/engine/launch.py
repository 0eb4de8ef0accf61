"""``launch``: detectron2's ``launch`` (same signature), made so that a job never hangs.

Spawned on one machine (``--num-gpus N``, with ``torch.multiprocessing.start_processes``) or
started by torchrun / a launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` (then nothing is spawned, the process group comes from ``env://`` and the
per-machine group from ``LOCAL_WORLD_SIZE``):

* every process group gets ``timeout`` (``MEGDET.DIST_TIMEOUT_S``), detectron2's per-machine
  group included (``process_groups.py``);
* spawned workers are supervised: the first that fails or is killed ends the others, and
  ``JobFailed`` names the root cause, the earliest worker's report (``supervise.py``;
  torchrun's agent does the same with its error files);
* every worker dies with its launcher or torchrun agent, and no process a worker started
  outlives the job.
"""

import os
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT

from ..errors import ConfigError
from .process_groups import init_process_groups
from .supervise import (
    exit_with_parent,
    orphans_killed,
    quiet_resource_tracker,
    run_worker,
    supervise,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "find_free_port",
    "launch",
    "launched_by_torchrun",
    "process_layout",
]

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


def find_free_port():
    """A TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in every process of the job, as ``detectron2.engine.launch``.

    Under torchrun the process-count arguments are ignored (the environment says them).
    ``dist_url`` ``"auto"`` (or None) on one machine: a free port on 127.0.0.1.

    Raises:
        JobFailed: a spawned worker failed or was killed (the others were then killed too).
    """
    if launched_by_torchrun():
        return _run_started_worker(main_func, args, timeout)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url 'auto' needs one machine; give tcp://HOST0:PORT")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    quiet_resource_tracker()
    first_rank = machine_rank * num_gpus_per_machine
    with tempfile.TemporaryDirectory(prefix="megdet_d2_reports_") as report_dir, orphans_killed():
        context = mp.start_processes(
            _spawned_worker,
            args=(main_func, args, first_rank, world_size, num_gpus_per_machine, dist_url,
                  timeout, os.getpid(), report_dir),
            nprocs=num_gpus_per_machine,
            join=False,
            start_method="spawn",
        )  # fmt: skip
        supervise(context, report_dir, first_rank)


def _spawned_worker(local_rank, main_func, args, first_rank, world_size, procs_per_machine,
                    dist_url, timeout, launcher_pid, report_dir):  # fmt: skip
    exit_with_parent(launcher_pid)
    rank = first_rank + local_rank
    init = (dist_url, world_size, rank, local_rank, procs_per_machine, timeout)
    run_worker(_init_and_run, (init, main_func, args), rank, report_dir)


def _init_and_run(init, main_func, args):
    init_process_groups(*init)
    return _run_then_destroy(main_func, args)


def _run_then_destroy(main_func, args):
    """``main_func(*args)``, then the process groups destroyed while the interpreter still runs:
    left to interpreter teardown, a backend's threads can end the finished process with
    "terminate called without an active exception" (SIGABRT; seen once on the 2-core CI)."""
    result = main_func(*args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _run_started_worker(main_func, args, timeout):
    """Under torchrun: this process is one worker of the job."""
    # torchrun's agent starts workers from its main thread: the kernel's signal is safe.
    exit_with_parent(os.getppid(), kernel_signal="TORCHELASTIC_RUN_ID" in os.environ)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, procs_per_machine = int(os.environ["WORLD_SIZE"]), process_layout(1)[1]

    def run():
        if world_size > 1:
            init_process_groups("env://", world_size, rank, local_rank, procs_per_machine, timeout)
        return _run_then_destroy(main_func, args)

    return run_worker(run, (), rank)
