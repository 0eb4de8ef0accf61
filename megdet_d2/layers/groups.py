"""Process groups over which CGBN reduces batch statistics (``MODEL.CGBN.GROUP_SIZE``).

The layout is made once, collectively, at start-up with ``create_cgbn_groups`` (creating a
group is a collective call that every rank must make in the same order, so it is never done
lazily inside a forward pass). ``CGBN`` layers with ``process_group=None`` look the group up
with ``get_cgbn_group`` on every call.
"""

import torch.distributed as dist
from detectron2.utils import comm

from ..errors import ConfigError

__all__ = [
    "check_group_size",
    "create_cgbn_groups",
    "get_cgbn_group",
    "get_cgbn_group_ranks",
    "group_ranks_count",
    "reset_cgbn_groups",
]

_KEY = "MODEL.CGBN.GROUP_SIZE"
# The configured layout; ``world`` is the default group it was made under, so a layout made
# before a ``destroy_process_group`` / re-init is recognised as stale and ignored.
_STATE = None


def check_group_size(group_size, world_size, procs_per_machine):
    """Raise a one-line ``ConfigError`` if ``group_size`` is invalid for this world (no I/O)."""
    hint = "(or be 0 = per machine, -1 = all ranks)"
    if not isinstance(group_size, int) or group_size < -1:
        raise ConfigError(f"{_KEY}={group_size} must be a positive divisor of the world size "
                          f"{world_size} {hint}")  # fmt: skip
    if group_size > 0 and world_size % group_size != 0:
        raise ConfigError(f"{_KEY}={group_size} must divide the world size {world_size} {hint}")
    if group_size == 0 and (procs_per_machine < 1 or world_size % procs_per_machine != 0):
        raise ConfigError(
            f"{_KEY}=0 needs a per-machine size dividing the world size {world_size}, "
            f"got {procs_per_machine} processes per machine"
        )


def group_ranks_count(group_size, world_size, procs_per_machine):
    """Processes per CGBN group for ``MODEL.CGBN.GROUP_SIZE`` (0: a machine, -1: all, k: k)."""
    return {0: procs_per_machine, -1: world_size}.get(group_size, group_size)


def _layout(group_size, world_size, procs_per_machine):
    block = group_ranks_count(group_size, world_size, procs_per_machine)
    return [list(range(start, start + block)) for start in range(0, world_size, block)]


def _local_group():
    """Detectron2's per-machine group (``comm.get_local_process_group()``), or None if no
    launcher made one."""
    try:
        return comm.get_local_process_group()
    except AssertionError:  # detectron2 asserts that the group exists
        return None


def _current():
    """The configured state if it belongs to the live default process group, else None."""
    if _STATE is None or not (dist.is_available() and dist.is_initialized()):
        return None
    return _STATE if _STATE["world"] is dist.group.WORLD else None


def create_cgbn_groups(group_size, timeout=None):
    """Create the CGBN process groups; call on ALL ranks after ``torch.distributed`` init.

    ``group_size``: ``0`` = detectron2's per-machine group (``comm.get_local_process_group()``,
    made by detectron2's ``launch``), ``k > 0`` = consecutive blocks of ``k`` ranks, ``-1`` =
    all ranks. Without ``torch.distributed`` (or with one process) no group is made and CGBN
    does no communication.

    ``timeout`` (a ``timedelta``): of the groups made here (a collective waits that long for a
    frozen or dead peer); None = torch's default (30 min for gloo), not the world group's.
    ``train_net.py`` passes ``MEGDET.DIST_TIMEOUT_S``. The ``0`` and ``-1`` layouts reuse the
    per-machine and world groups, which have the timeout they were made with.

    Calling it again with the same ``group_size`` returns the existing layout (no collective);
    with a different one raises ``RuntimeError`` -- call ``reset_cgbn_groups()`` on all ranks
    first.

    Returns:
        The layout as a list of rank lists, e.g. ``[[0, 1], [2, 3]]``, for logging.
    """
    global _STATE
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        check_group_size(group_size, 1, 1)
        return [[0]]
    state = _current()
    if state is not None:
        if state["group_size"] != group_size:
            raise RuntimeError(
                f"CGBN groups already created with {_KEY}={state['group_size']}; call "
                f"reset_cgbn_groups() on all ranks before creating them with {group_size}"
            )
        return [list(r) for r in state["layout"]]

    world_size, rank = dist.get_world_size(), dist.get_rank()
    local_group = _local_group()
    procs_per_machine = dist.get_world_size(local_group) if local_group is not None else 0
    if group_size == 0 and local_group is None:
        raise ValueError(
            f"{_KEY}=0 (per machine) needs detectron2's per-machine group: launch with "
            "detectron2.engine.launch or call comm.create_local_process_group first"
        )
    check_group_size(group_size, world_size, procs_per_machine)
    layout = _layout(group_size, world_size, procs_per_machine)
    if group_size == 0:
        group = local_group
    elif len(layout) == 1:
        group = dist.group.WORLD
    elif group_size == 1:
        group = None  # per-process statistics: no communication
    else:
        group = None
        for ranks in layout:  # every rank creates every block, in the same order
            new = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                group = new
    _STATE = {
        "world": dist.group.WORLD,
        "group_size": group_size,
        "group": group,
        "layout": layout,
        "ranks": next(r for r in layout if rank in r),
    }
    return [list(r) for r in layout]


def reset_cgbn_groups():
    """Forget the configured layout (local, no communication; groups are not destroyed)."""
    global _STATE
    _STATE = None


def get_cgbn_group():
    """The process group CGBN synchronises over, or None (no communication).

    Without ``create_cgbn_groups`` (e.g. a model built outside the trainer) and with more than
    one process, falls back to detectron2's per-machine group if it exists, else to WORLD:
    that is the ``GROUP_SIZE: 0`` default. Groups are never created here.
    """
    state = _current()
    if state is not None:
        return state["group"]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    local_group = _local_group()
    return local_group if local_group is not None else dist.group.WORLD


def get_cgbn_group_ranks():
    """Global ranks in this process's CGBN group (``[rank]`` when there is no group)."""
    state = _current()
    if state is not None:
        return list(state["ranks"])
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    group = get_cgbn_group()
    if group is None:
        return [dist.get_rank()]
    return dist.get_process_group_ranks(group)
