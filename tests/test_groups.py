"""CGBN process-group layout (``MODEL.CGBN.GROUP_SIZE``) on real gloo processes."""

import pytest
import torch
import torch.distributed as dist

from megdet_d2.layers.groups import (
    check_group_size,
    create_cgbn_groups,
    get_cgbn_group,
    get_cgbn_group_ranks,
    reset_cgbn_groups,
)
from tests.utils.dist import run_distributed


def _group_sum(group):
    """Sum of global ranks over ``group`` -- proves the group really joins those ranks."""
    t = torch.tensor([float(dist.get_rank())])
    if group is not None:
        dist.all_reduce(t, group=group)
    return int(t.item())


def _layouts(rank, world_size):
    res = {"fallback": (get_cgbn_group_ranks(), _group_sum(get_cgbn_group()))}
    for group_size in (0, 1, 2, 4, -1):
        reset_cgbn_groups()
        layout = create_cgbn_groups(group_size)
        res[group_size] = (layout, get_cgbn_group_ranks(), _group_sum(get_cgbn_group()))
    # Same size again: the same layout, no new groups; a different size: a clear error.
    res["again"] = create_cgbn_groups(-1)
    try:
        create_cgbn_groups(2)
        res["different"] = None
    except RuntimeError as e:
        res["different"] = str(e)
    reset_cgbn_groups()
    res["after_reset"] = create_cgbn_groups(2)
    return res


def test_layouts_on_four_ranks():
    results = run_distributed(_layouts, world_size=4, procs_per_machine=2)
    expected = {
        0: [[0, 1], [2, 3]],
        1: [[0], [1], [2], [3]],
        2: [[0, 1], [2, 3]],
        4: [[0, 1, 2, 3]],
        -1: [[0, 1, 2, 3]],
    }
    for rank, res in enumerate(results):
        machine = [0, 1] if rank < 2 else [2, 3]
        # Unconfigured: detectron2's per-machine group (the GROUP_SIZE 0 default).
        assert res["fallback"] == (machine, sum(machine))
        for group_size, layout in expected.items():
            mine = next(r for r in layout if rank in r)
            assert res[group_size] == (layout, mine, sum(mine)), (group_size, rank)
        assert res["again"] == expected[-1]
        assert "GROUP_SIZE=-1" in res["different"] and "reset_cgbn_groups" in res["different"]
        assert res["after_reset"] == expected[2]


@pytest.mark.parametrize(
    "size, world, per_machine, message",
    [
        (3, 4, 2, "MODEL.CGBN.GROUP_SIZE=3 must divide the world size 4 (or be 0 = per machine, "
                  "-1 = all ranks)"),
        (-2, 4, 2, "MODEL.CGBN.GROUP_SIZE=-2 must be a positive divisor of the world size 4 "
                   "(or be 0 = per machine, -1 = all ranks)"),
        (8, 4, 4, "MODEL.CGBN.GROUP_SIZE=8 must divide the world size 4"),
    ],
)  # fmt: skip
def test_check_group_size_rejects(size, world, per_machine, message):
    with pytest.raises(ValueError) as info:
        check_group_size(size, world, per_machine)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 2, 4, -1])
def test_check_group_size_accepts(size):
    check_group_size(size, 4, 2)


def test_without_distributed_no_group():
    assert not dist.is_initialized()
    assert create_cgbn_groups(0) == [[0]]
    assert get_cgbn_group() is None and get_cgbn_group_ranks() == [0]
    with pytest.raises(ValueError, match="GROUP_SIZE=-3"):
        create_cgbn_groups(-3)
