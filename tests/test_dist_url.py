"""``--dist-url``: detectron2's per-user default becomes a free port on one machine; an explicit
port in use is a one-line config error in the launcher. (Two jobs started at once with the
default both train: ``test_no_hang.py``.)"""

import os
import socket
import subprocess
import sys

import pytest
from detectron2.engine import default_argument_parser

from megdet_d2.engine.dist_url import resolve_dist_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")


@pytest.fixture
def taken_port():
    """A port some other process is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def not_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_default_url_becomes_a_free_port_on_one_machine_only():
    default = default_argument_parser().get_default("dist_url")
    assert resolve_dist_url(default, 2) == "auto"
    assert resolve_dist_url(default, 1) == default  # one process: no process group
    # several machines: the URL must name machine 0, nothing to pick here
    assert resolve_dist_url(default, 2, num_machines=2, machine_rank=1) == default


def test_taken_port_is_checked_where_it_is_listened_on(taken_port):
    url = f"tcp://127.0.0.1:{taken_port}"
    with pytest.raises(ValueError, match=rf"^--dist-url {url}: port {taken_port} is in use; "):
        resolve_dist_url(url, 2)
    assert resolve_dist_url(url, 2, num_machines=2, machine_rank=1) == url  # machine 0 listens
    assert resolve_dist_url(url, 1) == url


def test_taken_port_ends_train_net_with_one_line(tmp_path, taken_port):
    url = f"tcp://127.0.0.1:{taken_port}"
    cmd = [sys.executable, "train_net.py", "--num-gpus", "2", "--dist-url", url,
           "--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
           "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "8",
           "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Config error: --dist-url {url}: port {taken_port} is in use; ")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing was spawned
