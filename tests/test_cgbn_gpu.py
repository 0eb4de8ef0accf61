"""CGBN on real CUDA kernels (skipped without a GPU; run by ``scripts/gpu_check.sh``).

* the CPU stand-ins (``tests/utils/cuda_kernels.py``) against torch's real CUDA kernels, call by
  call: same success or failure, result dtypes, memory formats, None vs 0-element results,
  values;
* every case of ``tests/test_cgbn_cuda_path.py`` on real kernels, 2 and 3 processes sharing
  the GPU over gloo with CUDA tensors (NCCL refuses two processes on one GPU);
* the real NCCL calls: CGBN's synchronised Function on an NCCL group of one process, with the
  host syncs per call counted by torch's sync debug mode.
"""

import itertools
import zlib

import pytest
import torch
import torch.distributed as dist

from tests.test_cgbn_cuda_path import CASES, THREE, check, run_all
from tests.utils import cuda_kernels as K
from tests.utils.cgbn_cases import merge_with_empty_rows, run_case
from tests.utils.dist import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LAYOUTS = {"nchw": ((2, 3, 5, 4), False), "channels_last": ((2, 3, 5, 4), True),
           "1x1": ((4, 3, 1, 1), False)}  # fmt: skip


def _outcome(fn, args):
    """``("error",)`` or the results as (dtype, shape, channels_last, values) / None."""
    try:
        out = fn(*args)
    except RuntimeError:
        return ("error",)
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(
        (
            None
            if t is None
            else (t.dtype, tuple(t.shape), t.dim() == 4 and not t.is_contiguous(), t.detach().cpu())
        )
        for t in outs
    )


def _compare(name, args_cuda, args_cpu):
    real = _outcome(getattr(torch, name), args_cuda)
    standin = _outcome(getattr(K, name), args_cpu)
    assert (real == ("error",)) == (standin == ("error",)), (name, real, standin)
    if real == ("error",):
        return
    assert len(real) == len(standin), name
    for r, s in zip(real, standin):
        assert (r is None) == (s is None), (name, r, s)
        if r is not None:
            assert r[:3] == s[:3], (name, r[:3], s[:3])
            if r[3].numel():
                tol = 2e-2 if r[0] in (F16, BF16) else 1e-4
                assert torch.allclose(
                    r[3].double(), s[3].double(), atol=tol, rtol=tol, equal_nan=True
                ), (name, r[3], s[3])


def _tensors(dtype, layout, seed=0):
    shape, channels_last = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _both(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors], list(tensors)


@pytest.mark.parametrize(
    "dtype, layout, weight_dtype",
    list(itertools.product([F16, BF16, F32, F64], LAYOUTS, [None, "same", F32])),
)
def test_standins_equal_real_kernels(dtype, layout, weight_dtype):
    x, dy = _tensors(dtype, layout)
    acc = K.acc_type(dtype)
    c = x.shape[1]
    w = (
        None
        if weight_dtype is None
        else torch.rand(c).add(0.5).to(dtype if weight_dtype == "same" else weight_dtype)
    )
    b = None if w is None else torch.randn(c).to(w.dtype)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    _compare("batch_norm_stats", *_both(x, 1e-5))
    _compare("batch_norm_elemt", *_both(x, w, b, mean, invstd, 1e-5))
    flags_list = [(True, w is not None, w is not None), (False, False, False)]
    if w is not None:  # weight_g without a weight is undefined behaviour in the NCHW kernel
        flags_list.append((True, True, True))
    for flags in flags_list:
        _compare("batch_norm_backward_reduce", *_both(dy, x, mean, invstd, w, *flags))
    sums = (dy.to(acc).sum((0, 2, 3)), (dy.to(acc) * x.to(acc)).sum((0, 2, 3)))
    for count in (torch.tensor([7, 1], dtype=torch.int32), torch.tensor([7.0, 1.0])):
        for weight in (w, None if w is None else w.to(acc)):
            _compare(
                "batch_norm_backward_elemt",
                *_both(dy, x, mean, invstd, weight, *sums, count),
            )


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("running", [None, "fp32", "input"])
@pytest.mark.parametrize("counts_dtype", ["fp32", "input"])
def test_gather_standin_equals_real_kernel(dtype, running, counts_dtype):
    acc = K.acc_type(dtype)
    x = torch.randn(2, 3, 2, 2).to(dtype)
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 3, generator=g).to(acc)
    invstds = torch.rand(3, 3, generator=g).add(0.5).to(acc)
    rdtype = {None: None, "fp32": F32, "input": dtype}[running]
    rm = None if rdtype is None else torch.zeros(3, dtype=rdtype)
    rv = None if rdtype is None else torch.ones(3, dtype=rdtype)
    counts = torch.tensor([3.0, 70000.0, 5.0]).to(F32 if counts_dtype == "fp32" else dtype)
    args_cpu = [x, means, invstds, rm, rv, 0.1, 1e-5, counts]
    args_cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args_cpu]
    args_cpu = [t.clone() if isinstance(t, torch.Tensor) else t for t in args_cpu]
    _compare("batch_norm_gather_stats_with_counts", args_cuda, args_cpu)
    if rm is not None:  # the running statistics were updated alike
        real, standin = args_cuda[3].cpu(), args_cpu[3]
        assert torch.equal(real.isnan(), standin.isnan())
        assert torch.allclose(real.double(), standin.double(), atol=1e-2, equal_nan=True)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_empty_rows_weigh_nothing_in_the_real_gather(dtype):
    """CGBN's empty-process rows on the real kernel: as the stand-in (integer running count)."""
    real = merge_with_empty_rows(torch.batch_norm_gather_stats_with_counts, dtype, "cuda")
    standin = merge_with_empty_rows(K.batch_norm_gather_stats_with_counts, dtype)
    assert real["count_0_first"][:2].isnan().all()
    rtol = 1e-6 if dtype == F32 else 1e-13
    torch.testing.assert_close(real["cgbn_empty_rows"], real["alone"], rtol=rtol, atol=0)
    torch.testing.assert_close(real["cgbn_empty_rows"], standin["cgbn_empty_rows"], rtol=rtol,
                               atol=0)  # fmt: skip


def _paths_cuda(name):
    return ("cuda", "cpu")


@pytest.fixture(scope="module")
def two():
    return run_distributed(run_all, world_size=2, args=(CASES, _paths_cuda), timeout=300)


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_kernels_two_processes(two, name):
    for rank, results in enumerate(two):
        check(name, CASES[name], results[name, "cuda"], results[name, "cpu"], rank, syncs=False)


def test_real_kernels_three_processes():
    results = run_distributed(run_all, world_size=3, args=(THREE, _paths_cuda), timeout=300)
    for rank, res in enumerate(results):
        for name, opts in THREE.items():
            check(name, opts, res[name, "cuda"], res[name, "cpu"], rank, syncs=False)


def _single_process_cases():
    """CASES cut to one process's slice, where that slice has more than one value per channel
    (a group of one process with 0 or 1 values has nothing to normalise)."""
    out = {}
    for name, opts in CASES.items():
        h, w = opts.get("hw", (5, 4))
        if opts["ns"][0] * h * w > 1:
            out[name] = dict(opts, ns=opts["ns"][:1])
    return out


def _nccl_cases(rank, world_size):
    torch.cuda.set_device(0)
    group = dist.new_group([0], backend="nccl")
    dist.all_reduce(torch.zeros(1, device="cuda"), group=group)  # communicator made up front
    torch.cuda.synchronize()
    out = {}
    for name, opts in _single_process_cases().items():
        seed = zlib.crc32(name.encode()) % 1000
        for _ in range(2):  # the second run: a first call may sync once (measured, cold start)
            out[name] = run_case(0, [0], seed=seed, path="cuda", device="cuda", group=group,
                                 direct=True, **opts)  # fmt: skip
        out[name, "cpu"] = run_case(0, [0], seed=seed, path="cpu", direct=True, **opts)
    return out


def test_nccl_group_of_one_direct_function():
    results = run_distributed(_nccl_cases, world_size=1, timeout=300)[0]
    for name, opts in _single_process_cases().items():
        check(name, opts, results[name], results[name, "cpu"], 0, syncs=True)
