"""A job ends as a whole: a failed, killed or frozen process, or a dead launcher, ends all of its
processes, and the launcher says why in one line.

* Launcher (:func:`supervise`): waits for its workers; at the first one that fails or is
  killed it gives the others a few seconds, kills the rest with SIGKILL (which also ends a
  stopped process: SIGTERM would stay pending), each with the processes it started (its
  data-loader workers), and raises :class:`JobFailed`. A frozen worker (SIGSTOP, a stalled
  machine, a hung kernel) is noticed through its peers: a collective waits for it at most the
  process-group timeout, then fails in them.
* Worker (:func:`run_worker`): a failure ends the process at once (``os._exit`` after flushing
  the logs and killing the processes it started), because a process whose collective failed
  can hang in interpreter teardown (process-group destructors, non-daemon threads) and would
  keep the job alive.
* Worker (:func:`exit_with_parent`): the worker dies with its launcher or torchrun's agent, by
  SIGKILL from the kernel (``PR_SET_PDEATHSIG``, Linux; it reaches a stopped process too) and a
  thread that watches ``os.getppid()`` (any POSIX system, any launcher).
"""

import contextlib
import ctypes
import logging
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import re
import signal
import sys
import threading
import time
import traceback

import psutil

from ..errors import CONFIG_ERROR_EXIT_CODE

__all__ = [
    "JobFailed",
    "exit_with_parent",
    "kill_all",
    "pause_before_traceback",
    "quiet_resource_tracker",
    "run_worker",
    "supervise",
]

_GRACE_S = 3.0  # for the other workers to end by themselves after the first failure
_PEER_FAILURE_S = 2.0  # a failing worker's pause before its traceback (pause_before_traceback)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_MAX_REASON = 400  # characters of an exception message kept in the one-line reason
_paused = False  # pause_before_traceback has waited in this process


class JobFailed(RuntimeError):
    """A worker failed or was killed; the message is one line naming it and the cause.
    ``exit_code``: that worker's exit status (negative: killed by that signal)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def exit_with_parent(parent_pid, kernel_signal=True):
    """End this process when process ``parent_pid`` (its parent) ends.

    ``kernel_signal``: also ask Linux for SIGKILL at the parent's death. The kernel sends it when
    the *thread* that started this process ends, so use it only when that thread lives as long
    as the job (our launcher; torchrun's agent); the ``getppid`` watch has no such caveat.
    """
    if kernel_signal and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the signal was requested
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="megdet_d2-parent-watch", daemon=True
    ).start()


def _watch_parent(parent_pid):
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    _kill_children()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_children():
    """SIGKILL every process this one started (its data-loader workers). A worker ending with
    ``os._exit`` or SIGKILL leaves them behind otherwise: one still starting when its parent
    died records init as its parent, its torch watchdog never fires, and it lives on, holding
    the job's output pipes open."""
    _kill_descendants(psutil.Process())


def quiet_resource_tracker():
    """Start multiprocessing's resource tracker, which the launcher's workers and their
    data-loader workers share, without its warning about leaked semaphores. A failure ends
    workers by ``os._exit`` or SIGKILL, so their loaders' semaphores are never released; the
    tracker unlinks them all the same, but its warning, printed when the launcher exits, would
    follow and bury the job's one-line reason. (A tracker already running keeps its warning.)"""
    flag = "ignore:resource_tracker:UserWarning"  # the tracker's interpreter gets sys.warnoptions
    added = flag not in sys.warnoptions
    if added:
        sys.warnoptions.append(flag)
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:  # the workers' command lines stay as they were
        if added:
            sys.warnoptions.remove(flag)


def pause_before_traceback():
    """Wait ``_PEER_FAILURE_S`` before printing a failure's traceback, once per process (a failed
    worker ends; detectron2's train-loop log and :func:`run_worker` both call this): when the
    failure is only a peer's end (a collective whose peer exited with a config error), the
    launcher or torchrun's agent stops this process meanwhile, and the peer's one line stays
    the last word. A real failure is reported as before, two seconds later."""
    global _paused
    if not _paused:
        _paused = True
        time.sleep(_PEER_FAILURE_S)


def run_worker(fn, args, rank, report_path=None):
    """``fn(*args)``; if it raises, print the traceback, report one line (to ``report_path``
    for the launcher, else to stderr) and end the process with status 1.

    The traceback waits first (:func:`pause_before_traceback`)."""
    try:
        return fn(*args)
    except BaseException as e:  # every failure, KeyboardInterrupt included, ends the process
        if isinstance(e, SystemExit) and e.code in (None, 0):
            raise
        if isinstance(e, SystemExit) and isinstance(e.code, int):  # e.g. a config error: its
            _flush()  # one line is printed already; keep its status, add no traceback
            _kill_children()
            os._exit(e.code)
        pause_before_traceback()
        traceback.print_exc()
        reason = _one_line(e)
        if report_path is not None:
            with open(report_path, "w") as f:
                f.write(reason)
        else:
            print(f"rank {rank} failed: {reason}", file=sys.stderr)
        _flush()
        _kill_children()
        os._exit(1)


def _one_line(exc):
    lines = str(exc).strip().splitlines()
    # gloo prefixes "[/path/to/source.cc:78] ": the message is what follows
    first = re.sub(r"^\[[^\]\s]+:\d+\]\s*", "", lines[0]) if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _flush():
    try:
        logging.shutdown()  # flushes the log files
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a closed stream must not keep the process alive
        pass


def supervise(processes, report_dir, grace_s=_GRACE_S):
    """Wait for ``processes`` (``{global rank: started multiprocessing.Process}``); on the first
    failure stop the others and raise :class:`JobFailed`. Worker ``r`` may write its reason to
    ``report_dir/r``. No process is left running when this returns or raises."""
    running = dict(processes)
    try:
        while running:
            multiprocessing.connection.wait([p.sentinel for p in running.values()])
            ended = {r: p for r, p in running.items() if p.exitcode is not None}
            for rank in ended:
                del running[rank]
            failed = [r for r, p in ended.items() if p.exitcode != 0]
            if failed:
                # a rank killed by a signal is the likelier cause than a peer that then failed
                first = min(failed, key=lambda r: (ended[r].exitcode >= 0, r))
                cause = _failure(first, ended[first], report_dir)
                code = ended[first].exitcode
                # a config error's line is the cause: stop the others at once, before their
                # "connection closed" tracebacks bury it
                grace = 0.0 if code == CONFIG_ERROR_EXIT_CODE else grace_s
                raise JobFailed(cause + _stop_others(running, grace), code)
    finally:
        kill_all(processes.values())


def _failure(rank, process, report_dir):
    path = os.path.join(report_dir, str(rank))
    if os.path.isfile(path):
        with open(path) as f:
            return f"rank {rank} failed: {f.read().strip()}"
    code = process.exitcode
    if code < 0:
        try:
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"rank {rank} exited with status {code}"


def _stop_others(running, grace_s):
    """Give ``running`` ``grace_s`` to end, kill the rest; describe what was killed."""
    deadline = time.monotonic() + grace_s
    for process in running.values():
        process.join(max(0.0, deadline - time.monotonic()))
    killed = []
    for rank, process in sorted(running.items()):
        if process.exitcode is None:
            state = _state(process.pid)
            killed.append(f"rank {rank}" + (f" ({state})" if state else ""))
            _kill_tree(process)
    return f"; killed {', '.join(killed)}" if killed else ""


def _state(pid):
    """What ``/proc`` says about a process that did not end (Linux), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {
        "T": "stopped by a signal, e.g. SIGSTOP",
        "t": "stopped by a debugger",
        "D": "in uninterruptible sleep, e.g. a hung device or file system",
    }.get(code, "")


def _kill_descendants(process):
    """SIGKILL every process ``process`` (a ``psutil.Process``) started, recursively. psutil
    checks each is still the process it found (no pid reuse)."""
    with contextlib.suppress(psutil.Error):  # it ended meanwhile
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def _kill_tree(process):
    """SIGKILL a started ``multiprocessing.Process`` and the processes it started (first: once
    it is dead they are re-parented and no longer known as its own)."""
    with contextlib.suppress(psutil.Error):
        _kill_descendants(psutil.Process(process.pid))
    process.kill()


def kill_all(processes, timeout_s=30.0):
    """SIGKILL the processes still running, with the processes they started, and reap them (a
    process in uninterruptible sleep may outlive SIGKILL: it is waited for at most
    ``timeout_s``)."""
    processes = list(processes)
    for process in processes:
        if process.exitcode is None:
            _kill_tree(process)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
