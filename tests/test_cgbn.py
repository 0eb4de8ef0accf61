"""CGBN equals one BatchNorm2d over the group's concatenated batch (real gloo processes).

Every distributed check compares a CGBN layer on each process's slice with ``nn.BatchNorm2d`` run
on the concatenation of all slices of the group (loss = sum of the per-rank losses): outputs and
input gradients per slice, weight / bias gradients summed over the group (CGBN returns local
sums, DDP averages them), running statistics and ``num_batches_tracked``. Collectives are counted
with gloo's own per-group sequence numbers, so the real collectives run.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d
from fvcore.nn.precise_bn import get_bn_modules

from megdet_d2.layers.cgbn import CGBN
from megdet_d2.layers.groups import create_cgbn_groups, get_cgbn_group, reset_cgbn_groups
from megdet_d2.layers.norm_registry import NORM_REGISTRY
from tests.utils.dist import run_distributed

C, H, W = 3, 5, 4
TOL = 1e-10  # fp64 checks


def _data(ns, seed, mean=0.0, std=1.0):
    """Deterministic per-rank inputs and upstream gradients (fp64), identical on all ranks."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, C, H, W, generator=g, dtype=torch.float64) * std + mean for n in ns]
    gs = [torch.randn(n, C, H, W, generator=g, dtype=torch.float64) for n in ns]
    return xs, gs


def _layers(momentum=0.1, affine=True, dtype=torch.float64, seed=0):
    """A reference BatchNorm2d and a CGBN with the same random affine parameters and buffers."""
    ref = nn.BatchNorm2d(C, momentum=momentum, affine=affine).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1, generator=g)
        ref.running_var.uniform_(0.5, 2, generator=g)
        if affine:
            ref.weight.uniform_(0.5, 1.5, generator=g)
            ref.bias.uniform_(-1, 1, generator=g)
    cgbn = CGBN(C, momentum=momentum, affine=affine).to(dtype)
    cgbn.load_state_dict(ref.state_dict())
    return ref, cgbn


def _seq(groups):
    """gloo's per-group collective sequence numbers (each collective increments its group's)."""
    return [g._get_sequence_number_for_group() for g in groups]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare(rank, ranks, ns, seed, steps=1, momentum=0.1, affine=True, dtype=torch.float64,
             channels_last=False, mean=0.0, std=1.0, autocast=False):  # fmt: skip
    """Run CGBN on this rank's slice and BatchNorm2d on the group's batch; return max errors.

    ``ranks``: the global ranks of this rank's CGBN group, in order; ``ns[i]``: batch size of
    ``ranks[i]``. Weight / bias gradients are summed over the group before comparing.
    """
    ref, cgbn = _layers(
        momentum, affine, torch.float64 if dtype == torch.float64 else torch.float32
    )
    me = ranks.index(rank)
    start, stop = sum(ns[:me]), sum(ns[: me + 1])
    group = get_cgbn_group()
    counters = [dist.group.WORLD] + ([group] if group is not None else [])
    errs = {"out": 0.0, "gx": 0.0, "collectives": []}
    for step in range(steps):
        xs, gs = _data(ns, seed + step, mean, std)
        xref = torch.cat(xs)
        if dtype != torch.float64:  # the reference sees exactly the values CGBN sees
            xref = xref.to(dtype).double()
        xref.requires_grad_()
        out_ref = ref(xref)
        (out_ref * torch.cat(gs)).sum().backward()

        x = xs[me].to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        before = _seq(counters)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = cgbn(x)
        middle = _seq(counters)
        (out.double() * gs[me]).sum().backward()
        after = _seq(counters)
        errs["collectives"].append(
            [[m - b for b, m in zip(before, middle)], [a - m for m, a in zip(middle, after)]]
        )
        errs["out"] = max(errs["out"], _max_err(out, out_ref[start:stop].detach()))
        errs["gx"] = max(errs["gx"], _max_err(x.grad, xref.grad[start:stop]))
        errs["out_dtype"] = str(out.dtype)
        errs["channels_last"] = out.is_contiguous(memory_format=torch.channels_last)
        errs["finite"] = bool(torch.isfinite(out).all())
    if affine:
        gw, gb = cgbn.weight.grad.clone(), cgbn.bias.grad.clone()
        if group is not None:
            dist.all_reduce(gw, group=group)
            dist.all_reduce(gb, group=group)
        errs["gw"] = _max_err(gw, ref.weight.grad)
        errs["gb"] = _max_err(gb, ref.bias.grad)
    errs["rm"] = _max_err(cgbn.running_mean, ref.running_mean)
    errs["rv"] = _max_err(cgbn.running_var, ref.running_var)
    errs["rv_rel"] = ((cgbn.running_var.double() / ref.running_var) - 1).abs().max().item()
    errs["nbt"] = (int(cgbn.num_batches_tracked), int(ref.num_batches_tracked))
    return errs


def _empty_group(rank):
    """Every rank has N=0: empty output, no NaN, running stats untouched, both collectives run."""
    _, cgbn = _layers()
    state = {k: v.clone() for k, v in cgbn.state_dict().items()}
    x = torch.zeros(0, C, H, W, dtype=torch.float64, requires_grad=True)
    before = _seq([dist.group.WORLD])[0]
    out = cgbn(x)
    out.sum().backward()
    unchanged = all(torch.equal(state[k], v) for k, v in cgbn.state_dict().items())
    return {
        "shape": tuple(out.shape),
        "unchanged": unchanged,
        "collectives": _seq([dist.group.WORLD])[0] - before,
        "grads_zero": bool((cgbn.weight.grad == 0).all() and (cgbn.bias.grad == 0).all()),
    }


def _eval_no_communication(rank):
    """Eval mode on rank 0 only (rank 1 never calls): no collective, equals BatchNorm2d."""
    ref, cgbn = _layers()
    ref.eval()
    cgbn.eval()
    x = _data([4], 3)[0][0]
    before = _seq([dist.group.WORLD])[0]
    err = _max_err(cgbn(x), ref(x)) if rank == 0 else 0.0
    return {"err": err, "collectives": _seq([dist.group.WORLD])[0] - before}


def _two_ranks(rank, world_size):
    res = {}
    assert create_cgbn_groups(-1) == [[0, 1]]
    both = [0, 1]
    res["equal"] = _compare(rank, both, [2, 2], seed=1, steps=2)
    res["unequal"] = _compare(rank, both, [3, 1], seed=2)
    res["one_empty"] = _compare(rank, both, [2, 0], seed=3)
    res["cumulative"] = _compare(rank, both, [2, 3], seed=4, steps=3, momentum=None)
    res["no_affine"] = _compare(rank, both, [1, 2], seed=5, affine=False)
    res["channels_last"] = _compare(rank, both, [2, 1], seed=6, channels_last=True)
    res["large_mean"] = _compare(rank, both, [2, 2], 7, dtype=torch.float32, mean=1e4, std=1.0)
    res["bf16"] = _compare(rank, both, [2, 1], seed=8, dtype=torch.bfloat16)
    res["fp16"] = _compare(rank, both, [2, 1], seed=9, dtype=torch.float16)
    res["autocast_fp32_in"] = _compare(rank, both, [2, 1], 10, dtype=torch.float32, autocast=True)
    res["autocast_bf16_in"] = _compare(rank, both, [2, 1], 11, dtype=torch.bfloat16, autocast=True)
    res["empty_group"] = _empty_group(rank)
    res["eval"] = _eval_no_communication(rank)
    # Group size 1: per-process statistics. Equal to a per-process BatchNorm2d, and therefore
    # different from the concatenated reference (so the checks above can fail).
    reset_cgbn_groups()
    assert create_cgbn_groups(1) == [[0], [1]] and get_cgbn_group() is None
    res["per_process"] = _compare(rank, [rank], [2, 2][rank : rank + 1], seed=1)
    res["per_process_vs_concat"] = _compare(rank, both, [2, 2], seed=1)
    return res


def _four_ranks(rank, world_size):
    res = {}
    ns = [2, 1, 0, 3]
    for group_size, layout in [(2, [[0, 1], [2, 3]]), (-1, [[0, 1, 2, 3]]), (0, [[0, 1], [2, 3]])]:
        reset_cgbn_groups()
        assert create_cgbn_groups(group_size) == layout
        ranks = next(r for r in layout if rank in r)
        res[group_size] = _compare(rank, ranks, [ns[r] for r in ranks], seed=20 + group_size)
    return res


def _assert_matches(errs, tol=TOL, name=""):
    for key in ("out", "gx", "gw", "gb", "rm", "rv"):
        if key in errs:
            assert errs[key] <= tol, (name, key, errs[key])
    assert errs["nbt"][0] == errs["nbt"][1], (name, errs["nbt"])
    assert errs["finite"], name


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(_two_ranks, world_size=2)


@pytest.mark.parametrize(
    "case", ["equal", "unequal", "one_empty", "cumulative", "no_affine", "channels_last"]
)
def test_two_ranks_match_concatenated_batchnorm(two_rank_results, case):
    for rank, res in enumerate(two_rank_results):
        _assert_matches(res[case], name=(case, rank))


def test_one_collective_each_way(two_rank_results):
    for res in two_rank_results:
        for case in ("equal", "unequal", "one_empty", "channels_last", "bf16"):
            for fwd, bwd in res[case]["collectives"]:
                # [WORLD, CGBN group] counters; the CGBN group here is WORLD itself.
                assert fwd == [1, 1] and bwd == [1, 1], (case, fwd, bwd)


def test_channels_last_preserved(two_rank_results):
    assert all(res["channels_last"]["channels_last"] for res in two_rank_results)


def test_large_mean_fp32_is_accurate(two_rank_results):
    # mean 1e4, std 1 in fp32: naive E[x^2] - E[x]^2 in fp32 would lose the variance entirely.
    for res in two_rank_results:
        errs = res["large_mean"]
        assert errs["rv_rel"] < 1e-4 and errs["rm"] < 1e-2, errs
        # fp32 inputs of magnitude 1e4 carry ~1e-3 absolute rounding; outputs are ~N(0, 1).
        assert errs["out"] < 5e-3 and errs["gx"] < 1e-3, errs
        assert errs["nbt"] == (1, 1)


@pytest.mark.parametrize(
    "case, dtype, tol",
    [
        ("bf16", "torch.bfloat16", 5e-2),
        ("fp16", "torch.float16", 1e-2),
        ("autocast_bf16_in", "torch.bfloat16", 5e-2),
        ("autocast_fp32_in", "torch.float32", 1e-5),
    ],
)
def test_low_precision_stats_in_fp32(two_rank_results, case, dtype, tol):
    for res in two_rank_results:
        errs = res[case]
        assert errs["out_dtype"] == dtype
        assert errs["out"] < tol and errs["gx"] < tol, errs
        # Running stats from fp32 statistics: far tighter than the input dtype's resolution.
        assert errs["rm"] < 1e-5 and errs["rv"] < 1e-5, errs


def test_whole_group_empty(two_rank_results):
    for res in two_rank_results:
        r = res["empty_group"]
        assert r["shape"] == (0, C, H, W) and r["unchanged"] and r["grads_zero"], r
        assert r["collectives"] == 2, r  # forward + backward: nobody hangs


def test_eval_mode_no_communication(two_rank_results):
    for res in two_rank_results:
        assert res["eval"]["err"] == 0.0 and res["eval"]["collectives"] == 0


def test_group_size_one_is_per_process(two_rank_results):
    for res in two_rank_results:
        _assert_matches(res["per_process"])
        assert res["per_process"]["collectives"] == [[[0], [0]]]
        # Per-process statistics must NOT match the concatenated batch's.
        assert res["per_process_vs_concat"]["out"] > 1e-3
        assert res["per_process_vs_concat"]["rm"] > 1e-4


def test_four_ranks_group_sizes():
    results = run_distributed(_four_ranks, world_size=4, procs_per_machine=2)
    for rank, res in enumerate(results):
        for group_size, errs in res.items():
            _assert_matches(errs, name=(group_size, rank))
            # [WORLD, CGBN group] counters: one collective on the CGBN group each way, none
            # elsewhere (WORLD's counter moves only when WORLD is the CGBN group).
            expected = [1 if group_size == -1 else 0, 1]
            assert errs["collectives"] == [[expected, expected]], (group_size, errs)


# ---------------------------------------------------------------------------------------------
# Single process: no torch.distributed.
# ---------------------------------------------------------------------------------------------


def test_without_distributed_equals_batchnorm():
    assert get_cgbn_group() is None
    for training in (True, False):
        ref, cgbn = _layers()
        ref.train(training)
        cgbn.train(training)
        xs, gs = _data([3], 0)
        xr = xs[0].clone().requires_grad_()
        xc = xs[0].clone().requires_grad_()
        out_ref = ref(xr)
        (out_ref * gs[0]).sum().backward()
        out = cgbn(xc)
        (out * gs[0]).sum().backward()
        assert torch.equal(out, out_ref)
        assert torch.equal(xc.grad, xr.grad) and torch.equal(cgbn.weight.grad, ref.weight.grad)
        for key, value in ref.state_dict().items():
            assert torch.equal(cgbn.state_dict()[key], value), key


def test_is_batchnorm_and_registered():
    model = nn.Sequential(nn.Conv2d(3, C, 1), CGBN(C))
    assert isinstance(model[1], nn.BatchNorm2d)
    assert get_bn_modules(model) == [model[1]]
    assert NORM_REGISTRY.get("CGBN") is CGBN


def test_state_dict_compatible_with_batchnorm():
    ref, cgbn = _layers()
    assert list(cgbn.state_dict()) == list(ref.state_dict())
    bn = nn.BatchNorm2d(C).double()
    bn.load_state_dict(cgbn.state_dict())
    for key, value in cgbn.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value)


def test_loads_frozen_batchnorm_state_dict():
    frozen = FrozenBatchNorm2d(C)
    frozen.weight.uniform_(0.5, 1.5)
    frozen.running_mean.uniform_(-1, 1)
    state = frozen.state_dict()
    assert "num_batches_tracked" not in state
    cgbn = CGBN(C)
    cgbn.load_state_dict(state)  # strict
    assert torch.equal(cgbn.weight.data, frozen.weight)
    assert torch.equal(cgbn.running_mean, frozen.running_mean)
    assert int(cgbn.num_batches_tracked) == 0


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match="4D"):
        CGBN(C)(torch.randn(2, C, 5))


# CUDA (NCCL) half: tests/test_cgbn_cuda_path.py (emulated, CI) and tests/test_cgbn_gpu.py (GPU).
