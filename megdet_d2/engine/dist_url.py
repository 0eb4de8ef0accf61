"""``--dist-url`` on one machine: a free port by default, one line when the given port is taken.

detectron2's default URL is ``tcp://127.0.0.1:<port>`` with a port fixed per user id, so a
user's second job on a machine collides with the first and every worker dies with an
"address already in use" traceback. Left at that default on one machine, the URL becomes
``auto`` (a free port); a ``tcp://`` port given explicitly is checked on the machine that will
listen on it (machine rank 0) before anything is spawned.
"""

import errno
import socket
from urllib.parse import urlsplit

from detectron2.engine import default_argument_parser

from ..errors import ConfigError
from .launch import launched_by_torchrun

__all__ = ["resolve_dist_url"]


def resolve_dist_url(dist_url, num_gpus_per_machine, num_machines=1, machine_rank=0):
    """The URL to launch with: ``"auto"`` for detectron2's default on one machine, else
    ``dist_url``; a one-line ``ValueError`` if this machine must listen on a port in use."""
    if launched_by_torchrun() or num_gpus_per_machine * num_machines == 1:
        return dist_url  # no process group, or torchrun's own MASTER_ADDR / MASTER_PORT
    if num_machines == 1 and dist_url == default_argument_parser().get_default("dist_url"):
        return "auto"
    if machine_rank == 0 and dist_url.startswith("tcp://"):
        port = urlsplit(dist_url).port
        if port and _in_use(port):
            hint = " (or leave --dist-url out to use a free one)" if num_machines == 1 else ""
            raise ConfigError(
                f"--dist-url {dist_url}: port {port} is in use; another job or a leftover "
                f"process holds it: give a free port{hint}"
            )
    return dist_url


def _in_use(port):
    """Whether binding ``port`` on all addresses fails as the process-group store's would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, as it does
        try:
            s.bind(("", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False
