"""No hang on a frozen process or a dead launcher, with real processes and real signals.

* Every process group of a run (world, detectron2's per-machine group, CGBN's blocks) has
  ``MEGDET.DIST_TIMEOUT_S``.
* A worker frozen with SIGSTOP (rank 0 or 1; ``MODEL.CGBN.GROUP_SIZE`` 0 or -1; spawned or under
  torchrun) ends the whole job, non-zero, with a one-line reason, within the timeout + 60 s, and
  leaves no process behind. The two spawned jobs start together with detectron2's default
  ``--dist-url``, which is one port per user: both must run.
* SIGKILL of the launcher (one of its workers frozen) or of torchrun's agent ends the workers.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from detectron2.utils import comm

from megdet_d2.engine import launch
from megdet_d2.layers.groups import create_cgbn_groups, get_cgbn_group
from tests.utils.dist import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
TIMEOUT_S = 20  # MEGDET.DIST_TIMEOUT_S of the jobs
START_S = 240  # for a job to reach its second iteration (several jobs share 2 cores)


def _report_timeouts(out_dir, cgbn_timeout):
    """``main_func`` of ``launch``: each rank writes its groups' timeouts in seconds."""
    create_cgbn_groups(2, timeout=cgbn_timeout)
    groups = {
        "world": dist.group.WORLD,
        "local": comm.get_local_process_group(),
        "cgbn": get_cgbn_group(),
        "gather": comm._get_global_gloo_group(),  # comm.all_gather's group
    }
    timeouts = {
        name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        for name, group in groups.items()
    }
    ranks = dist.get_process_group_ranks(groups["cgbn"])
    with open(os.path.join(out_dir, f"{dist.get_rank()}.json"), "w") as f:
        json.dump({"timeouts": timeouts, "cgbn_ranks": ranks}, f)


def test_every_process_group_gets_the_run_timeout(tmp_path):
    launch(_report_timeouts, 4, args=(str(tmp_path), timedelta(seconds=17)),
           timeout=timedelta(seconds=17))  # fmt: skip
    for rank in range(4):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["cgbn_ranks"] == ([0, 1] if rank < 2 else [2, 3]), report
        # torch's default would be 1800 s for each group made without a timeout
        assert report["timeouts"] == dict.fromkeys(["world", "local", "cgbn", "gather"], 17), report


def _job(tmp_path, name, launcher, *opts):
    """Start a quickstart training of 1000 iterations (it is stopped long before)."""
    cmd = [sys.executable, *launcher, "--config-file", CONFIG,
           "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"), "MEGDET.QUICKSTART.NUM_TRAIN", "8",
           "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1000", "SOLVER.STEPS", "()",
           "SOLVER.WARMUP_ITERS", "1", "MEGDET.LOG_PERIOD", "1", "OUTPUT_DIR", str(tmp_path / name),
           "MEGDET.DIST_TIMEOUT_S", str(TIMEOUT_S), *opts]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / f"{name}.log"  # a file, not a pipe: nothing blocks on a full pipe
    with open(log, "w") as out:
        proc = psutil.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # so that a failed test can kill the job with its workers
        )  # fmt: skip
    proc.log, proc.metrics = log, tmp_path / name / "metrics.json"
    return proc


def _spawned(tmp_path, name, *opts):
    """``train_net.py --num-gpus 2`` with detectron2's default ``--dist-url``."""
    return _job(tmp_path, name, ["train_net.py", "--num-gpus", "2"], *opts)


def _torchrun(tmp_path, name, *opts):
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(find_free_port()), "train_net.py"]  # fmt: skip
    return _job(tmp_path, name, launcher, *opts)


def _wait_training(jobs):
    """Wait until every job has written two iterations of metrics."""
    deadline = time.monotonic() + START_S
    for job in jobs:
        while not (job.metrics.exists() and len(job.metrics.read_text().splitlines()) >= 2):
            assert job.poll() is None, job.log.read_text()[-5000:]
            assert time.monotonic() < deadline, f"{job.metrics.parent.name} did not start"
            time.sleep(0.5)


def _workers(job):
    """``{rank: psutil.Process}`` of a job's training processes."""
    children = job.children(recursive=True)
    if "torch.distributed.run" in job.cmdline():
        return {int(c.environ()["RANK"]): c for c in children if "train_net.py" in c.cmdline()}
    spawned = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    spawned = [c for c in spawned if "resource_tracker" not in " ".join(c.cmdline())]
    return dict(enumerate(sorted(spawned, key=lambda c: c.pid)))  # started in rank order


def _kill(jobs):
    for job in jobs:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _left(processes):
    """Those of ``processes`` still alive 15 s after the job ended (zombies count as gone)."""
    _, alive = psutil.wait_procs(processes, timeout=15)
    left = []
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    return left


def test_frozen_worker_ends_the_job(tmp_path):
    group_size = "MODEL.CGBN.GROUP_SIZE"
    cases = {  # name: (job, rank to freeze)
        "spawn_g0_rank0": (_spawned(tmp_path, "spawn_g0_rank0", group_size, "0"), 0),
        "spawn_g-1_rank1": (_spawned(tmp_path, "spawn_g-1_rank1", group_size, "-1"), 1),
        "torchrun_g0_rank1": (_torchrun(tmp_path, "torchrun_g0_rank1", group_size, "0"), 1),
    }
    jobs = [job for job, _ in cases.values()]
    try:
        _wait_training(jobs)
        processes, frozen_at = {}, {}
        for name, (job, rank) in cases.items():
            processes[name] = job.children(recursive=True)
            workers = _workers(job)
            assert sorted(workers) == [0, 1], (name, workers)
            workers[rank].send_signal(signal.SIGSTOP)
            frozen_at[name] = time.monotonic()
        for name, (job, rank) in cases.items():
            job.wait(timeout=TIMEOUT_S + 60)
            elapsed = time.monotonic() - frozen_at[name]
            print(f"{name}: ended {elapsed:.0f} s after SIGSTOP, status {job.returncode}")
            out = job.log.read_text()
            assert job.returncode != 0, (name, out[-5000:])
            assert elapsed < TIMEOUT_S + 60, (name, elapsed)
            if name.startswith("spawn"):
                # the launcher's last line: the failing peer, and the frozen rank it killed
                last = out.strip().splitlines()[-1]
                reason = rf"Job failed: rank {1 - rank} failed: .*; killed rank {rank} \(stopped"
                assert re.fullmatch(reason + r".*\)", last), (name, last)
            else:  # torchrun prints its own report; the worker said why in one line
                assert re.search(rf"^rank {1 - rank} failed: \S+", out, re.M), (name, out[-5000:])
            assert not _left(processes[name]), (name, _left(processes[name]))
    finally:
        _kill(jobs)


def test_killing_the_launcher_ends_the_workers(tmp_path):
    spawned, torchrun = _spawned(tmp_path, "spawn"), _torchrun(tmp_path, "torchrun")
    try:
        _wait_training([spawned, torchrun])
        workers = {job: _workers(job) for job in (spawned, torchrun)}
        assert all(sorted(w) == [0, 1] for w in workers.values()), workers
        # a frozen worker cannot notice anything itself: the kernel must end it
        workers[spawned][1].send_signal(signal.SIGSTOP)
        for job in (spawned, torchrun):
            job.send_signal(signal.SIGKILL)  # the launcher / the agent only, not its group
            job.wait()
        for job, ranks in workers.items():
            assert not _left(list(ranks.values())), (job.args, _left(list(ranks.values())))
    finally:
        _kill([spawned, torchrun])
