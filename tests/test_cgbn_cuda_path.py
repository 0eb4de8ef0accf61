"""CGBN's CUDA half, driven on CPU through the stand-ins of torch's CUDA kernels, in 2 and 3 real
gloo processes: equal to ``nn.BatchNorm2d`` on the concatenated batch and to CGBN's CPU half,
one collective each way, at most one host sync per forward (none when a process has more than
one value per channel) and none per backward. ``tests/test_cgbn_gpu.py`` runs the same cases on
real CUDA kernels when a GPU is present.
"""

import zlib

import pytest
import torch
import torch.distributed as dist

from megdet_d2.layers import cgbn_cuda
from megdet_d2.layers.cgbn import CGBN
from megdet_d2.layers.groups import create_cgbn_groups
from tests.utils.cgbn_cases import run_case, tolerance
from tests.utils.cuda_kernels import EMULATED, HostSyncCounter
from tests.utils.dist import run_distributed

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# name -> run_case options; every case runs on the emulated CUDA half and on the CPU half.
CASES = {
    "equal": dict(ns=[2, 2], steps=2),
    "unequal": dict(ns=[3, 1]),
    "one_empty": dict(ns=[2, 0]),
    "first_empty": dict(ns=[0, 3]),  # the empty process is first in rank order
    "one_value_each": dict(ns=[1, 1], hw=(1, 1)),  # 1 value per channel per process: 1 sync
    "no_affine": dict(ns=[1, 2], affine=False),
    "no_affine_channels_last": dict(ns=[2, 1], affine=False, channels_last=True),
    "no_affine_1x1": dict(ns=[3, 2], affine=False, hw=(1, 1)),  # NCHW, channels-last kernels
    "cumulative": dict(ns=[2, 3], steps=3, momentum=None),
    "untracked": dict(ns=[2, 1], track=False),
    "untracked_fp16": dict(ns=[2, 1], track=False, dtype=F16),
    "untracked_bf16": dict(ns=[2, 1], track=False, dtype=BF16),
    "channels_last": dict(ns=[2, 1], channels_last=True),
    "strided_input": dict(ns=[2, 1], strided=True),
    "fp16_input": dict(ns=[2, 1], dtype=F16),
    "bf16_input": dict(ns=[2, 1], dtype=BF16),
    "fp16_channels_last": dict(ns=[1, 2], dtype=F16, channels_last=True),
    "autocast": dict(ns=[2, 1], dtype=F32, autocast=BF16),
    # > 65504 values per channel per process in a .half() layer: fp16 counts would be inf
    "half_module_large": dict(ns=[1, 1], c=2, hw=(256, 260), dtype=F16, module_dtype=F16),
    "large_mean": dict(ns=[2, 2], dtype=F32, mean=1e4, std=1.0),
    "input_needs_no_grad": dict(ns=[2, 1], x_grad=False),
    "frozen_affine": dict(ns=[2, 1], frozen_affine=True),
    "replay": dict(ns=[2, 1], replay=True),
}
# fp32 inputs of magnitude 1e4 carry ~1e-3 absolute rounding; the outputs are ~N(0, 1)
# (running mean ~1e4: 1e-2 is 1e-6 relative)
TOLERANCE = {"large_mean": 5e-3}
STATS_TOLERANCE = {"large_mean": 1e-2}
NCCL_CASES = ("equal", "one_empty", "fp16_input", "cumulative")
THREE = {
    "three_unequal_empty": dict(ns=[2, 0, 3]),
    "three_first_empty": dict(ns=[0, 2, 1]),  # a leading empty row, on the NCCL branch too
    "three_fp16_channels_last": dict(ns=[1, 2, 1], dtype=F16, channels_last=True),
    "three_cumulative_no_affine": dict(ns=[1, 1, 2], steps=2, momentum=None, affine=False),
}


def run_all(rank, world_size, cases, paths):
    """Every case on every path of ``paths(name)``, in this process (CUDA tensors for "cuda")."""
    if "cuda" in paths(next(iter(cases))):
        torch.cuda.set_device(0)  # all processes share one GPU, over gloo
    create_cgbn_groups(-1)
    ranks = list(range(world_size))
    out = {}
    for name, opts in cases.items():
        for path in paths(name):
            seed = zlib.crc32(name.encode()) % 1000
            device = "cuda" if path == "cuda" else "cpu"
            out[name, path] = run_case(rank, ranks, seed=seed, path=path, device=device, **opts)
    return out


def _paths_two(name):
    return ("emulated", "cpu") + (("emulated_nccl",) if name in NCCL_CASES else ())


def _paths_three(name):
    return ("emulated", "emulated_nccl", "cpu")


@pytest.fixture(scope="module")
def two():
    return run_distributed(run_all, world_size=2, args=(CASES, _paths_two), timeout=240)


@pytest.fixture(scope="module")
def three():
    return run_distributed(run_all, world_size=3, args=(THREE, _paths_three), timeout=240)


def check(name, opts, res, cpu, rank, syncs=True):
    """Assert one case's result; ``cpu``: the same case on CGBN's CPU half; ``syncs``: also
    the host syncs per call (not where gloo moves CUDA tensors through the host)."""
    ns = opts["ns"]
    dtype, module_dtype = opts.get("dtype", torch.float64), opts.get("module_dtype")
    tol = TOLERANCE.get(name, tolerance(dtype, module_dtype))
    assert res["finite"], name
    for key in ("out", "gx", "gw", "gb"):
        if res.get(key) is not None:
            assert res[key] <= tol, (name, rank, key, res[key], tol)
    if opts.get("track", True):
        stats_tol = 3e-3 if module_dtype == F16 else (1e-10 if dtype == torch.float64 else 1e-5)
        stats_tol = STATS_TOLERANCE.get(name, stats_tol)
        assert res["rm"] <= stats_tol and res["rv"] <= stats_tol, (name, rank, res)
        assert res["nbt"][0] == res["nbt"][1], (name, rank, res["nbt"])
    assert res["out_dtype"] == str(dtype).replace("torch.", ""), (name, res["out_dtype"])
    if opts.get("channels_last") and ns[rank] > 0:
        assert res["channels_last"], name
    steps = opts.get("steps", 1)
    assert res["collectives"] == [(1, 1)] * steps, (name, rank, res["collectives"])
    if syncs:
        values = ns[rank] * opts.get("hw", (5, 4))[0] * opts.get("hw", (5, 4))[1]
        expected_fwd = 1 if values <= 1 else 0
        assert res["syncs"] == [(expected_fwd, 0)] * steps, (name, rank, res["syncs"])
    if opts.get("affine", True):
        frozen = opts.get("frozen_affine", False)
        assert res["gw_is_none"] == frozen and res["gb_is_none"] == frozen, (name, res)
        if not frozen:
            expected = str(module_dtype or (torch.float64 if dtype == torch.float64 else F32))
            assert res["gw_dtype"] == expected.replace("torch.", ""), (name, res["gw_dtype"])
    if opts.get("replay"):
        assert res["replay_equal"] and res["replay_collectives"] == 0, name
    # the CUDA half agrees with the CPU half
    assert (res["out_tensor"] - cpu["out_tensor"]).abs().max().item() <= tol if ns[rank] else True
    if res["gx_tensor"] is not None and ns[rank]:
        assert (res["gx_tensor"] - cpu["gx_tensor"]).abs().max().item() <= tol, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_cuda_half_two_processes(two, name):
    for rank, results in enumerate(two):
        for path in _paths_two(name):
            if path != "cpu":
                check(name, CASES[name], results[name, path], results[name, "cpu"], rank)


@pytest.mark.parametrize("name", sorted(THREE))
def test_emulated_cuda_half_three_processes(three, name):
    for rank, results in enumerate(three):
        for path in ("emulated", "emulated_nccl"):
            check(name, THREE[name], results[name, path], results[name, "cpu"], rank)


def test_cpu_half_also_matches(two):
    """The CPU half, the comparison's other side, matches the reference too."""
    for rank, results in enumerate(two):
        for name in ("equal", "one_empty", "channels_last", "cumulative"):
            res = results[name, "cpu"]
            assert res["out"] <= 1e-6 and res["gx"] <= 1e-6, (name, res)


def _whole_group_empty(rank, world_size):
    create_cgbn_groups(-1)
    layer = CGBN(3).double()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    seq = dist.group.WORLD._get_sequence_number_for_group
    before = seq()
    with cgbn_cuda.use_kernels(EMULATED):
        with HostSyncCounter() as syncs:
            out = layer(x)
        out.sum().backward()
    return {
        "shape": tuple(out.shape),
        "unchanged": all(torch.equal(state[k], v) for k, v in layer.state_dict().items()),
        "collectives": seq() - before,
        "syncs": syncs.count,
        "grads_zero": bool((layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()),
    }


def test_emulated_whole_group_empty():
    for r in run_distributed(_whole_group_empty, world_size=2):
        assert r == {
            "shape": (0, 3, 5, 4), "unchanged": True, "collectives": 2, "syncs": 1,
            "grads_zero": True,
        }  # fmt: skip


def _single_value_in_group(rank, world_size):
    create_cgbn_groups(-1)
    x = torch.randn(1 if rank == 0 else 0, 3, 1, 1, dtype=torch.float64)
    with cgbn_cuda.use_kernels(EMULATED):
        try:
            CGBN(3).double()(x)
        except ValueError as e:
            return str(e)
    return "no error"


def test_emulated_one_value_in_the_whole_group_is_an_error_on_every_process():
    for message in run_distributed(_single_value_in_group, world_size=2):
        assert "Expected more than 1 value per channel" in message
