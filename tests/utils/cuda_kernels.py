"""CPU stand-ins for torch's five CUDA batch-norm kernels, with CUDA's contracts.

CGBN's CUDA half (``megdet_d2/layers/cgbn_cuda.py``) calls ``batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``, ``batch_norm_backward_reduce`` and
``batch_norm_backward_elemt``, which exist only for CUDA tensors. The functions here compute the
same results on CPU tensors and enforce the rules of torch's CUDA sources
(``aten/src/ATen/native/cuda/Normalization.cu`` / ``.cuh``) that decide whether a call works:

* which kernel runs: the channels-last kernels when a tensor is channels_last-contiguous, or
  NCHW-contiguous with ``stride(1) == 1`` (H = W = 1); else the NCHW ("contiguous") kernels;
* which tensor drives the dtype dispatch and which dtype every other argument must then have
  (``Expected counts to have type Half but got Float`` and friends);
* the dtype and memory format of every result;
* what a missing weight gives: ``None`` from the NCHW backward-reduce kernel, **0-element
  tensors** from the channels-last one;
* arithmetic in the accumulate type (fp32 for fp16 / bf16 / fp32, fp64 for fp64), except
  where CUDA rounds: the NCHW backward-reduce kernel rounds each ``dy * (x - mean)`` term to
  the input's dtype before summing, and the gather kernel does its count arithmetic in the
  dispatch dtype (fp16 counts round above 2048 and overflow above 65504).

Checked against the real kernels on an H200 (torch 2.11) by ``tests/test_cgbn_gpu.py``; the two
rules that check corrected are marked "measured" below.

``tests/test_cuda_emulation.py`` checks the stand-ins against torch's own ``nn.SyncBatchNorm``
autograd Function (run on them, it must equal ``nn.BatchNorm2d`` on the concatenated batch and
reproduce that Function's known dtype bugs); on a GPU ``scripts/gpu_check.sh`` compares them
with the real kernels.

:class:`EMULATED` is the namespace CGBN's CUDA half takes (``cgbn_cuda.use_kernels``);
:class:`EMULATED_NCCL` also takes the NCCL branch of the forward gather, through a stand-in for
``all_gather_into_tensor`` with NCCL's contract, carried over gloo.
"""

import types
import warnings

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_type(dtype):
    """CUDA's accumulate type: fp64 for fp64, fp32 for every other floating type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dispatch(dtype, name):
    if dtype not in _FLOATS:
        raise RuntimeError(f"\"{name}\" not implemented for '{dtype}'")


def _expect(t, dtype, name):
    """A packed accessor's check: ``t`` (if defined) must have exactly ``dtype``."""
    if t is not None and t.dtype != dtype:
        raise RuntimeError(f"Expected {name} to have type {dtype} but got {t.dtype}")


def _expect_ptr(t, dtype):
    """``data_ptr<T>()``'s check (the channels-last kernels use raw pointers)."""
    if t is not None and t.dtype != dtype:
        raise RuntimeError(f"expected scalar type {dtype} but found {t.dtype}")


def uses_channels_last_kernel(t):
    """``batch_norm_use_channels_last_kernels``: channels_last, or NCHW with stride(1) == 1."""
    return t.is_contiguous(memory_format=torch.channels_last) or (
        t.is_contiguous() and t.stride(1) == 1
    )


def _mixed(x, *params):
    """``is_mixed_type``: the first defined parameter's dtype differs from the input's."""
    first = next((p for p in params if p is not None), None)
    return first is not None and first.dtype != x.dtype


def _vec(t):
    return t.view(1, -1, 1, 1)


def _reduce(t):
    return t.sum(dim=(0, 2, 3))


def batch_norm_stats(input, eps):
    """Per-channel mean and 1 / sqrt(biased var + eps), in the accumulate type (contiguous)."""
    _check_dispatch(input.dtype, "batch_norm_stats_cuda")
    acc = acc_type(input.dtype)
    x = input.to(acc)
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    if n == 0:  # Welford over nothing: mean 0, var 0 / 0
        mean = torch.zeros(x.shape[1], dtype=acc)
        return mean, torch.full_like(mean, float("nan"))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return mean.contiguous(), torch.rsqrt(var + eps).contiguous()


def batch_norm_gather_stats_with_counts(
    input, mean, invstd, running_mean, running_var, momentum, eps, counts
):
    """Merge per-process (mean, invstd, count) rows, as the CUDA reduce-statistics kernel does.

    Dispatch type: ``running_mean``'s dtype if given, else ``input``'s. ``mean`` and ``invstd``
    must be its accumulate type; ``running_mean`` / ``running_var`` / ``counts`` the dispatch
    type itself. Rows are merged in order; a row with count 0 first gives NaN (1 / 0 * 0), which
    is why torch's own Function masks empty processes out.
    """
    scalar = running_mean.dtype if running_mean is not None else input.dtype
    _check_dispatch(scalar, "batch_norm_update_stats_cuda")
    acc = acc_type(scalar)
    _expect(mean, acc, "mean")
    _expect(invstd, acc, "invstd")
    _expect(running_mean, scalar, "running_mean")
    _expect(running_var, scalar, "running_mean")  # sic: CUDA names it so
    _expect(counts, scalar, "counts")
    avg = torch.zeros(mean.shape[1], dtype=acc)
    var_n = torch.zeros_like(avg)
    n = torch.zeros((), dtype=torch.float64)  # index_t in CUDA: an integer
    for j in range(mean.shape[0]):
        count = counts[j]  # the dispatch type: fp16 counts are already rounded / inf
        c = count.to(acc)
        v = 1.0 / invstd[j]
        v = (v * v - eps) * c
        denom = n.to(scalar) + count  # int + scalar_t, in scalar_t arithmetic
        factor = (1.0 / denom.double()).to(acc)
        var_n = var_n + v + (avg - mean[j]) ** 2 * n.to(acc) * c * factor
        avg = n.to(acc) * factor * avg + c * factor * mean[j]
        n = torch.trunc(n + count.double())
    out_invstd = 1.0 / torch.sqrt(var_n / n.to(acc) + eps)
    if running_mean is not None:
        new = (1 - momentum) * running_mean.to(acc) + momentum * avg
        running_mean.copy_(new.to(scalar))
    if running_var is not None:
        unbiased = var_n / (n.to(acc) - 1)
        running_var.copy_(((1 - momentum) * running_var.to(acc) + momentum * unbiased).to(scalar))
    return avg.to(acc), out_invstd.to(acc)


def batch_norm_elemt(input, weight, bias, mean, invstd, eps):
    """``(x - mean) * invstd * weight + bias``; output in ``input``'s suggested memory format."""
    _check_dispatch(input.dtype, "batch_norm_elementwise_cuda")
    acc = acc_type(input.dtype)
    if not (input.is_contiguous() or uses_channels_last_kernel(input)):
        stat_acc = acc  # the "General" TensorIterator kernel: any parameter dtypes
    elif uses_channels_last_kernel(input):
        second = next((p.dtype for p in (weight, bias) if p is not None), input.dtype)
        if input.dtype != second:
            for p in (weight, bias):
                _expect_ptr(p, acc)
        elif weight is not None and weight.dtype != input.dtype:
            raise RuntimeError(
                f"batchnorm_forward: input.scalar_type() {input.dtype} is not supported with "
                f"weight.scalar_type() {weight.dtype}"
            )
        _expect_ptr(mean, acc)
        _expect_ptr(invstd, acc)
        stat_acc = acc
    else:
        stat = acc if _mixed(input, weight, bias) else input.dtype
        stat_acc = acc_type(stat)
        _expect(weight, stat, "weight")
        _expect(bias, stat, "bias")
        _expect(mean, stat_acc, "mean")
        _expect(invstd, stat_acc, "invstd")
    y = (input.to(stat_acc) - _vec(mean)) * _vec(invstd)
    if weight is not None:
        y = y * _vec(weight.to(stat_acc))
    if bias is not None:
        y = y + _vec(bias.to(stat_acc))
    fmt = torch.channels_last if _is_channels_last(input) else torch.contiguous_format
    return y.to(input.dtype).contiguous(memory_format=fmt)


def _is_channels_last(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def batch_norm_backward_reduce(grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g):
    """``(sum_dy, sum_dy_xmu, grad_weight, grad_bias)`` per channel.

    Channels-last kernel (both tensors channels-last-ish, weight / mean / invstd contiguous):
    always returns all four; without a weight, grad_weight / grad_bias are 0-element tensors.
    NCHW kernel: each result is ``None`` unless its flag is set.
    """
    _check_dispatch(grad_output.dtype, "batch_norm_backward_reduce")
    acc = acc_type(input.dtype)
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    channels_last = (
        uses_channels_last_kernel(grad_output)
        and uses_channels_last_kernel(input)
        and (weight is None or weight.is_contiguous())
        and mean.is_contiguous()
        and invstd.is_contiguous()
    )
    if channels_last:
        if weight is not None and input.dtype != weight.dtype:
            _expect_ptr(weight, acc)
        _expect_ptr(grad_output, input.dtype)
        _expect_ptr(mean, acc)
        _expect_ptr(invstd, acc)
        stat_acc = acc
    else:
        _expect(input, grad_output.dtype, "input")
        stat = acc if _mixed(input, weight) else input.dtype
        stat_acc = acc_type(stat)
        _expect(mean, stat_acc, "mean")
        _expect(invstd, stat_acc, "invstd")
        if (weight_g or bias_g) and weight is None:
            raise RuntimeError("batch_norm_backward_reduce: weight_g / bias_g need a weight")
        if weight_g or bias_g:  # grad_weight / grad_bias: weight's dtype, accessed as ``stat``
            # (measured: fp64 input with an fp32 weight fails here)
            _expect(weight, stat, "grad_weight")
    dy = grad_output.to(stat_acc)
    sum_dy = _reduce(dy)
    prod = dy * (input.to(stat_acc) - _vec(mean))
    if not channels_last:
        # The NCHW kernel's Float2 takes each term as the input's dtype before summing it in
        # the accumulate type: fp16 / bf16 terms are rounded (measured).
        prod = prod.to(input.dtype).to(stat_acc)
    sum_dy_xmu = _reduce(prod)
    if channels_last:
        if weight is None:
            empty = torch.empty(0, dtype=mean.dtype)
            return sum_dy, sum_dy_xmu, empty, empty.clone()
        return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd).to(weight.dtype), sum_dy.to(weight.dtype)
    return (
        sum_dy if input_g else None,
        sum_dy_xmu if input_g else None,
        (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
        sum_dy.to(weight.dtype) if bias_g else None,
    )


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """grad_input from the group's sums; ``count``: int32 per-process counts.

    The kernel is chosen by ``grad_output``'s layout alone and then reads ``input`` with that
    layout: a mismatch would read wrong values on a GPU, so it is an error here.
    """
    _check_dispatch(grad_output.dtype, "batch_norm_backward_elemt")
    acc = acc_type(input.dtype)
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    if count.dtype != torch.int32:
        raise RuntimeError(f"expected scalar type Int but found {count.dtype}")
    channels_last = uses_channels_last_kernel(grad_output)
    if channels_last:
        if not uses_channels_last_kernel(input):
            raise RuntimeError(
                "batch_norm_backward_elemt: grad_output picks the channels-last kernel but input "
                "is not channels-last (a GPU would read it with the wrong layout)"
            )
        if weight is not None and weight.dtype != input.dtype:
            _expect_ptr(weight, acc)
        for t in (mean, invstd, sum_dy, sum_dy_xmu):
            _expect_ptr(t, acc)
        _expect_ptr(input, grad_output.dtype)
        stat_acc = acc
    else:
        _expect(input, grad_output.dtype, "input")
        low = input.dtype in (torch.float16, torch.bfloat16) and mean.dtype == torch.float32
        stat = acc if low else input.dtype
        stat_acc = acc_type(stat)
        _expect(mean, stat_acc, "mean")
        _expect(invstd, stat_acc, "invstd")
        _expect(weight, stat, "weight")
        _expect(sum_dy, stat_acc, "sum_dy")
        _expect(sum_dy_xmu, stat_acc, "sum_dy_xmu")
    norm = 1.0 / count.to(torch.int64).sum().to(stat_acc)
    factor_2 = invstd if weight is None else weight.to(stat_acc) * invstd
    factor_1 = invstd * invstd * sum_dy_xmu * norm
    dy = grad_output.to(stat_acc)
    grad = (dy - _vec(sum_dy * norm) - (input.to(stat_acc) - _vec(mean)) * _vec(factor_1)) * _vec(
        factor_2
    )
    fmt = torch.channels_last if channels_last and _is_channels_last(input) else None
    grad = grad.to(input.dtype)
    return grad.contiguous(memory_format=fmt) if fmt else grad.contiguous()


# Calls that make the host wait for the device when their tensor lives on a GPU.
_SYNCING = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
    torch.unique, torch.Tensor.unique, torch.equal, torch.Tensor.equal,
    torch.Tensor.repeat_interleave, torch.repeat_interleave,
}  # fmt: skip
_IN_KERNEL = [0]  # > 0 while a stand-in kernel runs (its own tensor code is not CGBN's)


def _is_bool_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls in a block that would synchronise the host with a GPU (``.item()``,
    ``int(t)``, ``bool(t)``, boolean-mask indexing, ``nonzero``, copies to the host, ...),
    except inside the stand-in kernels. On real CUDA tensors, use
    ``torch.cuda.set_sync_debug_mode`` instead (``count_cuda_syncs``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _IN_KERNEL[0]:
            if func in _SYNCING or (func is torch.Tensor.__getitem__ and _is_bool_index(args[1])):
                self.count += 1
        return func(*args, **kwargs)


def _uncounted(fn):
    def kernel(*args, **kwargs):
        _IN_KERNEL[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _IN_KERNEL[0] -= 1

    kernel.__name__ = fn.__name__
    return kernel


class count_cuda_syncs:
    """Context: counts CUDA host synchronisations (torch's sync debug mode, as warnings)."""

    def __enter__(self):
        self.count = 0
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.count = sum("synchroniz" in str(w.message).lower() for w in self._records)
        return False


def nccl_all_gather_into_tensor(output, input, group=None):
    """``all_gather_into_tensor`` with NCCL's contract (same dtype and device, contiguous,
    output = world x input as one flat or stacked tensor), carried out over gloo."""
    world = dist.get_world_size(group)
    if output.dtype != input.dtype or output.device != input.device:
        raise RuntimeError("all_gather_into_tensor: output and input differ in dtype / device")
    if not (output.is_contiguous() and input.is_contiguous()):
        raise RuntimeError("all_gather_into_tensor: tensors must be contiguous")
    if output.numel() != world * input.numel() or output.shape[0] not in (
        world,
        world * len(input),
    ):
        raise RuntimeError(
            f"all_gather_into_tensor: output {tuple(output.shape)} is not {world} x input"
        )
    parts = list(output.view(world, -1).unbind(0))
    dist.all_gather(parts, input.view(-1), group=group)


EMULATED = types.SimpleNamespace(
    batch_norm_stats=_uncounted(batch_norm_stats),
    batch_norm_gather_stats_with_counts=_uncounted(batch_norm_gather_stats_with_counts),
    batch_norm_elemt=_uncounted(batch_norm_elemt),
    batch_norm_backward_reduce=_uncounted(batch_norm_backward_reduce),
    batch_norm_backward_elemt=_uncounted(batch_norm_backward_elemt),
    gathers_into_tensor=lambda group: False,  # gloo's branch: all_gather into a list
    all_gather_into_tensor=None,
)
EMULATED_NCCL = types.SimpleNamespace(
    **{
        **vars(EMULATED),
        "gathers_into_tensor": lambda group: True,
        "all_gather_into_tensor": _uncounted(nccl_all_gather_into_tensor),
    }
)


def patch_torch_kernels():
    """Make ``torch.batch_norm_*`` the stand-ins in this process (for torch's own
    ``nn.SyncBatchNorm`` Function, which calls them by those names)."""
    for name in (
        "batch_norm_stats",
        "batch_norm_gather_stats_with_counts",
        "batch_norm_elemt",
        "batch_norm_backward_reduce",
        "batch_norm_backward_elemt",
    ):
        setattr(torch, name, _uncounted(globals()[name]))
