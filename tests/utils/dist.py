"""Run a test function in N real processes joined by a gloo process group on 127.0.0.1.

Usage::

    def _check(rank, world_size, x):       # module level, so spawn can pickle it
        ...
        return something_picklable

    results = run_distributed(_check, world_size=2, args=(x,))   # list indexed by rank

A failing child re-raises in the parent with the child's traceback; a child that hangs is killed
after ``timeout`` seconds and the test fails, so no test can hang CI.
"""

import datetime
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megdet_d2.engine.launch import find_free_port


def _worker(rank, fn, world_size, procs_per_machine, port, args, result_dir, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # Longer than the parent's deadline, so a hang is reported as a hang by the parent.
        timeout=datetime.timedelta(seconds=timeout_s + 30),
    )
    try:
        from detectron2.utils import comm

        # detectron2's per-machine group, as its `launch` creates it.
        comm.create_local_process_group(procs_per_machine)
        try:
            result = fn(rank, world_size, *args)
        except BaseException:
            # Timestamped, so the parent can report the root cause rather than the peers'
            # "connection reset" errors that follow it.
            with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
                f.write(f"{time.time()}\n{traceback.format_exc()}")
            raise
        with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()
        open(os.path.join(result_dir, f"{rank}.done"), "w").close()  # every rank has its result
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, args=(), procs_per_machine=None, timeout=120):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results.

    Args:
        fn: a module-level function (spawn pickles it by reference).
        procs_per_machine: size of detectron2's per-machine group (default: all in one machine).
        timeout: seconds before the whole group is killed and ``TimeoutError`` raised.
    """
    procs_per_machine = procs_per_machine or world_size
    assert world_size % procs_per_machine == 0, (world_size, procs_per_machine)
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, procs_per_machine, find_free_port(), args, result_dir, timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{fn.__name__} did not finish in {timeout}s on {world_size} ranks"
                    )
        except Exception as e:
            for p in ctx.processes:
                p.kill()
                p.join()
            if isinstance(e, TimeoutError):
                raise  # a hang stays a hang, whatever its killed ranks' peers then report
            errors = _child_errors(result_dir)
            if errors:
                raise ChildProcessError(f"{fn.__name__} failed:\n{errors}") from e
            done = [
                os.path.exists(os.path.join(result_dir, f"{r}.done")) for r in range(world_size)
            ]
            if not all(done):
                raise
            # Every rank returned and passed the final barrier: a crash after that is gloo's
            # teardown under load ("terminate called without an active exception"), not fn's.
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _child_errors(result_dir):
    """Children's tracebacks, earliest first (the first failure is usually the cause)."""
    errors = []
    for name in os.listdir(result_dir):
        if name.endswith(".err"):
            with open(os.path.join(result_dir, name)) as f:
                parts = f.read().split("\n", 1)
            if len(parts) == 2:  # not one a killed process left half-written
                errors.append((float(parts[0]), int(name[:-4]), parts[1]))
    return "\n".join(f"-- rank {rank}:\n{tb}" for _, rank, tb in sorted(errors))
