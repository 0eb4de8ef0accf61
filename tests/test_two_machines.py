"""Two "machines" x 2 processes via detectron2's real ``launch``: CGBN groups are per machine.

Two parent processes on this host each call ``detectron2.engine.launch(..., num_machines=2,
machine_rank=r)``, exactly as on two machines. Every worker creates the CGBN groups with
``GROUP_SIZE 0`` and runs one CGBN forward on rank-specific data; the statistics it normalised
with must be those of its machine's two processes only.
"""

import datetime
import os
import signal
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch

from tests.utils.dist import find_free_port

_TIMEOUT_S = 150


def _worker(result_dir):
    """``main_func`` of ``launch``: runs on each of the 4 ranks."""
    rank = dist.get_rank()
    try:
        torch.set_num_threads(1)
        from megdet_d2.layers import CGBN
        from megdet_d2.layers.groups import create_cgbn_groups, get_cgbn_group

        layout = create_cgbn_groups(0)
        group_ranks = dist.get_process_group_ranks(get_cgbn_group())
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 3, 4, 4, generator=gen) + 10.0 * rank  # rank-specific statistics
        norm = CGBN(3, momentum=1.0).train()  # momentum 1: running_mean = the mean used
        y = norm(x)
        result = {
            "layout": layout,
            "group_ranks": group_ranks,
            "local_mean": x.mean(dim=(0, 2, 3)),
            "used_mean": norm.running_mean.clone(),
            "output_mean": y.detach().mean(dim=(0, 2, 3)),
        }
        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
        dist.barrier()
    except BaseException:
        with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _machine(main_func, machine_rank, dist_url, result_dir, timeout_s):
    """One "machine": a new process group (so the test can kill it with its workers)."""
    os.setsid()
    launch(
        main_func,
        2,
        num_machines=2,
        machine_rank=machine_rank,
        dist_url=dist_url,
        args=(result_dir,),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _run_two_machines(main_func, result_dir, timeout_s=_TIMEOUT_S):
    """Run ``main_func(result_dir)`` on 2 machines x 2 processes; return the ranks' results."""
    ctx = mp.get_context("spawn")
    dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    machines = [
        ctx.Process(
            target=_machine,
            args=(main_func, r, dist_url, result_dir, timeout_s),
            daemon=False,
        )
        for r in (0, 1)
    ]
    for p in machines:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        # Stop waiting at the deadline, or as soon as one machine fails (the other would hang).
        while any(p.exitcode is None for p in machines) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in machines):
                break
            time.sleep(0.5)
    finally:
        hung = [p for p in machines if p.exitcode is None]
        for p in hung:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the machine process and its launched workers
            except ProcessLookupError:  # exited, or killed before its setsid()
                p.kill()
            p.join()
    errors = ""
    for name in sorted(os.listdir(result_dir)):
        if name.endswith(".err"):
            with open(os.path.join(result_dir, name)) as f:
                errors += f"-- rank {name[:-4]}:\n{f.read()}"
    assert [p.exitcode for p in machines] == [0, 0], (
        f"two-machine launch failed or did not finish in {timeout_s}s (killed: {len(hung)})\n"
        f"{errors}"
    )
    return [torch.load(os.path.join(result_dir, f"{rank}.pt")) for rank in range(4)]


def test_cgbn_groups_and_statistics_per_machine(tmp_path):
    results = _run_two_machines(_worker, str(tmp_path))

    assert [r["layout"] for r in results] == [[[0, 1], [2, 3]]] * 4
    assert [r["group_ranks"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for machine in (0, 1):
        a, b = results[2 * machine], results[2 * machine + 1]
        expected = (a["local_mean"] + b["local_mean"]) / 2  # equal batch sizes
        # Equal within a machine, the machine's pooled mean, not the process's own mean.
        torch.testing.assert_close(a["used_mean"], expected)
        torch.testing.assert_close(b["used_mean"], expected)
        assert not torch.allclose(a["used_mean"], a["local_mean"], atol=1.0)
        # Pooled normalisation: the two processes' outputs have opposite mean offsets.
        torch.testing.assert_close(a["output_mean"], -b["output_mean"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(results[0]["used_mean"], results[2]["used_mean"], atol=1.0)
