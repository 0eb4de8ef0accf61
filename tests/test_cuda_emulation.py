"""The CPU stand-ins of torch's CUDA batch-norm kernels (``tests/utils/cuda_kernels.py``) are
validated before they are trusted to test CGBN's CUDA half:

* torch's own ``nn.SyncBatchNorm`` autograd Function, run on them in 2 real gloo processes,
  equals ``nn.BatchNorm2d`` on the concatenated batch;
* they reproduce that Function's known failures on a GPU (fp16 input without running statistics;
  a ``.half()`` layer with more than 65504 values per channel) and its host syncs;
* each kernel's contract: result dtypes and memory formats, what a missing weight gives on
  each kernel, the argument dtypes it insists on.

On a GPU, ``tests/test_cgbn_gpu.py`` also compares them with the real kernels.
"""

import pytest
import torch
import torch.nn.functional as F

from megdet_d2.layers.groups import create_cgbn_groups
from tests.utils import cuda_kernels as K
from tests.utils.cgbn_cases import merge_with_empty_rows, run_case, tolerance
from tests.utils.dist import run_distributed

F16, F32, F64 = torch.float16, torch.float32, torch.float64
SYNCBN_CASES = {
    "equal": dict(ns=[2, 2], steps=2),
    "unequal": dict(ns=[3, 1]),
    "one_empty": dict(ns=[2, 0]),
    "channels_last": dict(ns=[2, 1], channels_last=True),
    "no_affine": dict(ns=[1, 2], affine=False),
    "fp16_input": dict(ns=[2, 1], dtype=F16),
    "cumulative": dict(ns=[2, 3], steps=3, momentum=None),
}


def _syncbn(rank, world_size):
    K.patch_torch_kernels()
    create_cgbn_groups(-1)
    out = {}
    for name, opts in SYNCBN_CASES.items():
        out[name] = run_case(rank, [0, 1], seed=7, path="syncbn", **opts)
    for name, opts in {
        "untracked_fp16": dict(ns=[2, 1], track=False, dtype=F16),
        "half_module_large": dict(ns=[1, 1], c=2, hw=(256, 260), dtype=F16, module_dtype=F16),
    }.items():
        try:
            out[name] = run_case(rank, [0, 1], seed=7, path="syncbn", **opts)
        except RuntimeError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def syncbn():
    return run_distributed(_syncbn, world_size=2, timeout=180)


@pytest.mark.parametrize("name", sorted(SYNCBN_CASES))
def test_torch_syncbn_on_standins_matches_batchnorm(syncbn, name):
    opts = SYNCBN_CASES[name]
    tol = tolerance(opts.get("dtype", F64))
    for rank, results in enumerate(syncbn):
        res = results[name]
        for key in ("out", "gx", "gw", "gb"):
            if key in res:
                assert res[key] <= tol, (name, rank, key, res[key])
        assert res["rm"] <= 1e-5 and res["rv"] <= 1e-5, (name, rank, res)
        assert res["nbt"][0] == res["nbt"][1]
        assert res["collectives"] == [(1, 1)] * opts.get("steps", 1), res["collectives"]


def test_torch_syncbn_syncs_the_host_in_forward(syncbn):
    # its empty-process mask (boolean indexing), once per forward; none in backward
    for results in syncbn:
        for name in SYNCBN_CASES:
            for fwd, bwd in results[name]["syncs"]:
                assert fwd >= 1 and bwd == 0, (name, fwd, bwd)


def test_standins_reproduce_syncbn_fp16_without_running_stats_failure(syncbn):
    # the gather kernel dispatches on the fp16 input, then wants fp16 counts
    for results in syncbn:
        assert "Expected counts to have type torch.float16" in results["untracked_fp16"]


def test_standins_reproduce_syncbn_half_count_overflow(syncbn):
    # a .half() layer: counts cast to fp16 overflow above 65504 values per process
    for results in syncbn:
        assert results["half_module_large"]["finite"] is False


def _x(shape=(2, 3, 5, 4), dtype=F32, channels_last=False, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [F16, torch.bfloat16, F32, F64])
def test_stats_in_accumulate_type(dtype):
    x = _x(dtype=dtype)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    assert mean.dtype == invstd.dtype == (F64 if dtype == F64 else F32)
    var, m = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean.double(), m, atol=1e-6)
    assert torch.allclose(invstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_forward_kernels_equal_batch_norm(channels_last, affine):
    x = _x(channels_last=channels_last)
    w, b = (torch.rand(3) + 0.5, torch.randn(3)) if affine else (None, None)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    out = K.batch_norm_elemt(x, w, b, mean, invstd, 1e-5)
    ref = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last or not (
        channels_last
    )
    assert out.is_contiguous() != channels_last


@pytest.mark.parametrize(
    "shape, channels_last, kernel",
    [((2, 3, 5, 4), False, "nchw"), ((2, 3, 5, 4), True, "channels_last"),
     ((4, 3, 1, 1), False, "channels_last")],  # NCHW with H = W = 1: stride(1) == 1
)  # fmt: skip
def test_backward_reduce_without_weight(shape, channels_last, kernel):
    x = _x(shape, channels_last=channels_last)
    dy = _x(shape, channels_last=channels_last, seed=1)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    sum_dy, sum_dy_xmu, gw, gb = K.batch_norm_backward_reduce(
        dy, x, mean, invstd, None, True, False, False
    )
    assert torch.allclose(sum_dy, dy.sum((0, 2, 3)), atol=1e-5)
    if kernel == "channels_last":  # 0-element tensors, not undefined ones
        assert gw.numel() == 0 and gb.numel() == 0
    else:
        assert gw is None and gb is None


def test_backward_elemt_wants_int32_counts_and_float_weight_for_half_input():
    x = _x(dtype=F16)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    sums = torch.zeros(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="Int"):
        K.batch_norm_backward_elemt(x, x, mean, invstd, None, *sums, torch.tensor([40.0]))
    with pytest.raises(RuntimeError, match="Expected weight to have type torch.float32"):
        K.batch_norm_backward_elemt(
            x,
            x,
            mean,
            invstd,
            torch.ones(3, dtype=F16),
            *sums,
            torch.tensor([40], dtype=torch.int32)
        )


def test_gather_with_an_empty_first_row_gives_nan():
    mean = torch.tensor([[0.0], [1.0]])
    invstd = torch.tensor([[1.0], [1.0]])
    m, s = K.batch_norm_gather_stats_with_counts(
        mean, mean, invstd, None, None, 0.1, 1e-5, torch.tensor([0.0, 4.0])
    )
    assert torch.isnan(s).all()
    m, s = K.batch_norm_gather_stats_with_counts(
        mean, mean.flip(0), invstd, None, None, 0.1, 1e-5, torch.tensor([4.0, 0.0])
    )
    assert m.item() == 1.0 and torch.isfinite(s).all()


def test_gather_merges_like_one_batch():
    xs = [_x((n, 3, 2, 2), F64, seed=n) for n in (1, 3, 2)]
    stats = [K.batch_norm_stats(x, 1e-5) for x in xs]
    counts = torch.tensor([x.numel() / 3 for x in xs], dtype=F64)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    m, s = K.batch_norm_gather_stats_with_counts(
        xs[0], torch.stack([a for a, _ in stats]), torch.stack([b for _, b in stats]),
        rm, rv, 0.5, 1e-5, counts,
    )  # fmt: skip
    var, mean = torch.var_mean(torch.cat(xs), dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(m, mean, atol=1e-12) and torch.allclose(s, (var + 1e-5).rsqrt())
    n = counts.sum()
    assert torch.allclose(rv, 0.5 + 0.5 * var * n / (n - 1)) and torch.allclose(rm, 0.5 * mean)


def test_backward_reduce_nchw_rounds_half_terms_and_checks_weight_dtype():
    x, dy = _x(dtype=F16), _x(dtype=F16, seed=1)
    mean, invstd = K.batch_norm_stats(x, 1e-5)
    _, sum_dy_xmu, _, _ = K.batch_norm_backward_reduce(
        dy, x, mean, invstd, None, True, False, False
    )
    terms = (dy.float() * (x.float() - mean.view(1, -1, 1, 1))).half().float()
    assert torch.equal(sum_dy_xmu, terms.sum((0, 2, 3)))
    x64 = _x(dtype=F64)
    m64, s64 = K.batch_norm_stats(x64, 1e-5)
    with pytest.raises(RuntimeError, match="grad_weight"):
        K.batch_norm_backward_reduce(x64, x64, m64, s64, torch.ones(3), True, True, True)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_empty_rows_weigh_nothing_in_the_gather(dtype):
    """Why CGBN's CUDA half needs neither a mask nor a sort for empty processes: their count
    (the smallest normal float) keeps the merge finite where count 0 first gives NaN, and the
    result equals the merge of the non-empty rows alone."""
    res = merge_with_empty_rows(K.batch_norm_gather_stats_with_counts, dtype)
    assert res["count_0_first"][:2].isnan().all()
    rtol = 1e-6 if dtype == F32 else 1e-13
    torch.testing.assert_close(res["cgbn_empty_rows"], res["alone"], rtol=rtol, atol=0)
