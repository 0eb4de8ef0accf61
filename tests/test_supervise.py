"""supervise.pause_before_traceback: a failed worker waits once before its traceback, however
many reporters (detectron2's train-loop log, run_worker) call it."""

import subprocess
import sys

from megdet_d2.engine import supervise

CODE = """
import time
from megdet_d2.engine.supervise import pause_before_traceback
times = []
for _ in range(2):
    start = time.monotonic()
    pause_before_traceback()
    times.append(time.monotonic() - start)
print(*times)
"""


def test_pause_before_traceback_waits_once_per_process():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    first, second = map(float, out.stdout.split())
    assert first >= supervise._PEER_FAILURE_S and second < 0.5 * supervise._PEER_FAILURE_S
