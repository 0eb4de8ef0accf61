"""A job ends as a whole, and its last line is the root cause, chosen by data, not by timing.

* Worker (:func:`run_worker`): a failure ends the process at once (``os._exit`` after flushing
  the logs and killing the processes it started), because a process whose collective failed
  can hang in interpreter teardown and would keep the job alive. First it writes its report:
  one line (``Config error: ...`` or ``rank R failed: Type: message``), its traceback, exit
  status and the time, to ``<report dir>/<rank>.json``, as torch elastic's workers write their
  error files. Under torchrun it prints them and writes torchrun's error file instead (whose
  summary names the earliest as root cause).
* Launcher (:func:`supervise`): torch's ``ProcessContext.join(grace_period=...)`` waits for the
  workers and, at the first failure, gives the others the grace period, then SIGTERM, then
  SIGKILL (which also ends a stopped process). Added here, what torch lacks: the root cause is
  the earliest report (a worker that died by a signal without one, killed from outside,
  precedes them all); a stopped worker that had to be killed is named; and the processes the
  workers started (data-loader workers) are killed too (:func:`orphans_killed`).
* Worker (:func:`exit_with_parent`): the worker dies with its launcher or torchrun's agent, by
  SIGKILL from the kernel (``PR_SET_PDEATHSIG``, Linux; it reaches a stopped process too, where
  torch's SIGINT would stay pending) and a thread that watches ``os.getppid()``.
"""

import contextlib
import ctypes
import json
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
from torch.multiprocessing.spawn import ProcessException

from ..errors import CONFIG_ERROR_EXIT_CODE, ConfigError, config_error_line

__all__ = [
    "JobFailed",
    "exit_with_parent",
    "orphans_killed",
    "quiet_resource_tracker",
    "report_line",
    "reports_to_launcher",
    "run_worker",
    "supervise",
]

_GRACE_S = 3.0  # for the other workers to end by themselves after the first failure
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_MAX_REASON = 400  # characters of an exception message kept in the one-line reason
_report_dir = None  # set in a spawned worker: its failures go to the launcher as reports


class JobFailed(RuntimeError):
    """A worker failed or was killed; the message is one line naming the root cause.
    ``exit_code``: that worker's exit status (negative: killed by that signal);
    ``traceback``: its traceback ("" for a config error or a killed worker)."""

    def __init__(self, message, exit_code=1, traceback=""):
        super().__init__(message)
        self.exit_code = exit_code
        self.traceback = traceback

    @property
    def last_line(self):
        """What the launcher prints last: the config error as is, else ``Job failed: ...``."""
        return str(self) if self.exit_code == CONFIG_ERROR_EXIT_CODE else f"Job failed: {self}"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def exit_with_parent(parent_pid, kernel_signal=True):
    """End this process when process ``parent_pid`` (its parent) ends.

    ``kernel_signal``: also ask Linux for SIGKILL at the parent's death. The kernel sends it when
    the *thread* that started this process ends, so use it only when that thread lives as long
    as the job (our launcher; torchrun's agent); the ``getppid`` watch has no such caveat.
    """
    if kernel_signal and sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the signal was requested
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="megdet_d2-parent-watch", daemon=True
    ).start()


def _watch_parent(parent_pid):
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    _kill_descendants(psutil.Process())
    os.kill(os.getpid(), signal.SIGKILL)


def quiet_resource_tracker():
    """Start multiprocessing's resource tracker, which the launcher's workers and their
    data-loader workers share, without its warning about leaked semaphores. A failure ends
    workers by ``os._exit`` or a signal, so their loaders' semaphores are never released; the
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


def reports_to_launcher():
    """Whether this process is a spawned worker whose failure the launcher reports (then the
    worker's own console shows no traceback: the launcher prints the root cause's)."""
    return _report_dir is not None


def report_line(line, traceback_text=""):
    """Print ``line`` on stderr (after ``traceback_text``), and leave both in torchrun's error
    file (its summary names the earliest as root cause)."""
    print(f"{traceback_text}{line}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            with open(error_file, "w") as f:  # the format torchrun's @record writes
                info = {"py_callstack": traceback_text or line, "timestamp": str(int(time.time()))}
                json.dump({"message": {"message": line, "extraInfo": info}}, f)


def run_worker(fn, args, rank, report_dir=None):
    """``fn(*args)``; if it raises, report it and end the process: status 2 for a
    ``ConfigError`` (one line, no traceback), else 1 (or a ``SystemExit``'s status).

    ``report_dir``: write the report there for the launcher (:func:`supervise`), printing
    nothing; None (torchrun): print it, and write torchrun's error file."""
    global _report_dir
    _report_dir = report_dir
    try:
        return fn(*args)
    except BaseException as e:  # every failure, KeyboardInterrupt included, ends the process
        failed_at = time.time()
        if isinstance(e, SystemExit) and e.code in (None, 0):
            raise
        trace = ""
        if isinstance(e, ConfigError):
            code, line = CONFIG_ERROR_EXIT_CODE, f"Config error: {config_error_line(e)}"
        elif isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 1
            line = f"rank {rank} exited with status {code}"
        else:
            code, line, trace = 1, f"rank {rank} failed: {_one_line(e)}", traceback.format_exc()
        if report_dir is not None:
            report = {"rank": rank, "time": failed_at, "line": line, "traceback": trace}
            _write_report(report_dir, rank, dict(report, exit_code=code))
        elif not isinstance(e, SystemExit):  # a SystemExit's message is printed already
            report_line(line, trace)
        _flush()
        _kill_descendants(psutil.Process())  # its data-loader workers
        os._exit(code)


def _write_report(report_dir, rank, report):
    """Atomically (the launcher never reads half a report)."""
    path = os.path.join(report_dir, f"{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


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


def supervise(context, report_dir, first_rank=0, grace_s=_GRACE_S):
    """Wait for the workers of ``context`` (``torch.multiprocessing.start_processes(...,
    join=False)``; worker ``i`` has global rank ``first_rank + i`` and reports to
    ``report_dir``). On a failure stop the others (torch's join) and raise :class:`JobFailed`
    naming the root cause: the earliest report, or a worker killed from outside."""
    processes = dict(enumerate(context.processes))
    pending = dict(processes)
    while pending:
        multiprocessing.connection.wait([p.sentinel for p in pending.values()])
        ended = {i: p for i, p in pending.items() if p.exitcode is not None}
        pending = {i: p for i, p in pending.items() if i not in ended}
        failed = {i: p.exitcode for i, p in ended.items() if p.exitcode != 0}
        if failed:
            break
    else:
        context.join()  # all succeeded: torch's bookkeeping
        return
    states = {i: _state(p.pid) for i, p in pending.items()}  # before they are killed
    logger = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ..."
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        while not context.join(grace_period=grace_s):
            pass
    except ProcessException:  # the first failure: ours is read from the reports below
        pass
    finally:
        logger.setLevel(level)
    reports = _read_reports(report_dir)
    killed = [i for i in pending if processes[i].exitcode < 0 and first_rank + i not in reports]
    outside = [i for i in failed if failed[i] < 0 and first_rank + i not in reports]
    if outside:  # died by a signal before anything failed in the launcher's view
        i = min(outside)
        root = {"line": _signal_line(first_rank + i, failed[i]), "exit_code": failed[i]}
    elif reports:
        root = min(reports.values(), key=lambda r: (r["time"], r["rank"]))
    else:
        i = min(failed)
        root = {"line": f"rank {first_rank + i} exited with status {failed[i]}", "exit_code": 1}
    message = root["line"]
    if killed and root["exit_code"] != CONFIG_ERROR_EXIT_CODE:
        names = [
            f"rank {first_rank + i}" + (f" ({states[i]})" if states[i] else "") for i in killed
        ]
        message += f"; killed {', '.join(names)}"
    raise JobFailed(message, root["exit_code"], root.get("traceback", ""))


def _read_reports(report_dir):
    reports = {}
    for name in os.listdir(report_dir):
        if name.endswith(".json"):
            with open(os.path.join(report_dir, name)) as f:
                report = json.load(f)
            reports[report["rank"]] = report
    return reports


def _signal_line(rank, code):
    try:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"rank {rank} exited with status {code}"


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


def _subreaper(on):
    """Make this process the subreaper of its descendants (Linux); returns the previous
    setting (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc, previous = _libc(), ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(bool(on)), 0, 0, 0)
    return previous.value


@contextlib.contextmanager
def orphans_killed(timeout_s=30.0):
    """Every process started inside the block, and every process they start, is gone when it
    ends. torch stops a worker by SIGTERM / SIGKILL, which leaves its data-loader workers
    behind (one still starting as its parent dies never notices, and holds the job's output
    pipes open); as their subreaper this process adopts them, and kills them here. (A process
    in uninterruptible sleep may outlive SIGKILL: it is waited for at most ``timeout_s``.)"""
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    previous = _subreaper(True)
    try:
        yield
    finally:
        left = [c for c in me.children() if c.pid not in before]
        for child in left:
            _kill_descendants(child)
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(left, timeout=timeout_s)
        if previous is not None:
            _subreaper(previous)
