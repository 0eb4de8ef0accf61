"""CGBN's CUDA half: torch's fused CUDA batch-norm kernels around one collective each way.

forward: ``batch_norm_stats`` -> one all-gather of every process's ``[mean, invstd, count]``
(``all_gather_into_tensor`` on NCCL, a list all-gather on gloo) ->
``batch_norm_gather_stats_with_counts`` -> ``batch_norm_elemt``.
backward: ``batch_norm_backward_reduce`` -> one all-reduce of ``[sum(dy), sum(dy * (x - mean))]``
-> ``batch_norm_backward_elemt``.

What differs from ``nn.SyncBatchNorm``'s Function, and why:

* **No host synchronisation** when this process has more than one value per channel (the usual
  case); one (reading the group's total) when it has 0 or 1, because then the group may have
  nothing or a single value to normalise. Empty processes are neither masked out (a boolean mask
  is a sync) nor sorted: see ``_empty_count``. ``momentum=None`` takes 1 / num_batches_tracked on
  the device. The backward never synchronises.
* **Statistics in fp32** (fp64 for fp64 input) whatever the module's dtype: the gather kernel's
  dispatch type is driven by a tensor of that dtype and its counts are in that dtype, so a
  ``.half()`` module neither rounds counts above 2048 nor overflows them above 65504
  (pytorch#70901), and fp16 / bf16 input without running statistics does not trip the kernel's
  "counts must be Half" rule. Running statistics of another dtype are updated from those fp32
  values.
* **A missing weight gives no gradient**: the channels-last backward-reduce kernel returns
  0-element tensors for grad_weight / grad_bias when weight is None; they are dropped.
* **Work autograd would discard is skipped**: no ``batch_norm_backward_elemt`` when the input
  needs no gradient, no grad_weight / grad_bias when the affine parameters are frozen; the
  backward all-reduce is always joined, so processes never disagree.

The kernels are looked up in a namespace (``torch`` by default). ``use_kernels`` swaps in
stand-ins and routes CPU tensors here, which is how CI drives this code without a GPU
(``tests/utils/cuda_kernels.py``).
"""

import contextlib
import types

import torch
import torch.distributed as dist

from ..modeling.statistics_tape import forward_collective
from .cgbn_common import as_layout_of, check_total, stat_dtype

__all__ = ["TORCH_KERNELS", "backward", "forward", "takes", "use_kernels"]


def _empty_count(dtype):
    """The count an empty process sends: the smallest normal number of the statistics' dtype.

    The gather kernel merges rows in rank order with ``factor = 1 / (n + count)``; a leading
    row with count 0 would divide by 0 (NaN). With this count the factor stays finite, and the
    row still weighs nothing: its mean is 0, its variance term ``(1 / invstd**2 - eps) * count``
    is ~1e-38, and the kernel's running count ``n`` is an integer (``index_t``), so adding it
    leaves ``n`` unchanged. Integer casts of the counts (backward's, the total) also drop it.
    """
    return torch.finfo(dtype).tiny


def _all_gather_into_tensor(output, input, group=None):
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


# torch's CUDA kernels and collective choice; looked up at call time.
TORCH_KERNELS = types.SimpleNamespace(
    batch_norm_stats=lambda *a: torch.batch_norm_stats(*a),
    batch_norm_gather_stats_with_counts=lambda *a: torch.batch_norm_gather_stats_with_counts(*a),
    batch_norm_elemt=lambda *a: torch.batch_norm_elemt(*a),
    batch_norm_backward_reduce=lambda *a: torch.batch_norm_backward_reduce(*a),
    batch_norm_backward_elemt=lambda *a: torch.batch_norm_backward_elemt(*a),
    # gloo has no all_gather_into_tensor; NCCL's is one fused call
    gathers_into_tensor=lambda group: dist.get_backend(group) != dist.Backend.GLOO,
    all_gather_into_tensor=_all_gather_into_tensor,
)

_STANDIN = None  # the namespace installed by use_kernels, if any


def takes(x):
    """Whether this half handles ``x``: CUDA tensors, or any tensor under ``use_kernels``."""
    return x.is_cuda or _STANDIN is not None


def _kernels():
    return TORCH_KERNELS if _STANDIN is None else _STANDIN


@contextlib.contextmanager
def use_kernels(namespace):
    """Run CGBN's CUDA half, for every tensor, on ``namespace``'s kernels (stand-ins)."""
    global _STANDIN
    previous, _STANDIN = _STANDIN, namespace
    try:
        yield
    finally:
        _STANDIN = previous


def _gather(kernels, gathered, local, group):
    """The forward's one collective: every process's row, in rank order, into ``gathered``."""
    if kernels.gathers_into_tensor(group):
        kernels.all_gather_into_tensor(gathered, local, group=group)
    else:
        dist.all_gather(list(gathered.unbind(0)), local, group=group)


def _param(t, x, acc):
    """A weight / bias in a dtype every kernel accepts with ``x``: its own if it is ``x``'s or
    the accumulate type, else the accumulate type."""
    if t is None or t.dtype in (x.dtype, acc):
        return t
    return t.to(acc)


def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum,
            group):  # fmt: skip
    kernels = _kernels()
    num_channels = x.shape[1]
    count = x.numel() // num_channels if num_channels else 0  # host-side: no sync
    acc = stat_dtype(x)
    if count > 0:
        mean, invstd = kernels.batch_norm_stats(x, eps)
        local = torch.cat([mean, invstd, mean.new_full((1,), count)])
    else:  # mean 0, invstd 1 and a count that weighs nothing but keeps the merge finite
        local = torch.ones(2 * num_channels + 1, dtype=acc, device=x.device)
        local[:num_channels] = 0
        local[-1] = _empty_count(acc)
    gathered = local.new_empty(dist.get_world_size(group), local.numel())
    forward_collective(gathered, lambda: _gather(kernels, gathered, local, group))

    ctx.group, ctx.num_channels, ctx.acc = group, num_channels, acc
    ctx.param_dtypes = (
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
    )
    ctx.group_empty = False
    means, invstds = gathered[:, :num_channels], gathered[:, num_channels:-1]
    counts = gathered[:, -1]
    if count <= 1:  # only then can the group hold 0 or 1 values: the one host sync
        total = int(counts.sum().item())
        check_total(total)
        if total == 0:
            ctx.group_empty = True
            ctx.save_for_backward(x)
            return torch.empty_like(x)

    fused = running_mean is not None and running_mean.dtype == acc and momentum is not None
    if fused:  # the kernel updates the running statistics itself
        num_batches_tracked.add_(1)
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(
            gathered, means, invstds, running_mean, running_var, momentum, eps, counts
        )
    else:  # ``gathered`` (acc dtype) drives the kernel's dispatch: fp32 statistics and counts
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(
            gathered, means, invstds, None, None, 0.0, eps, counts
        )
        if running_mean is not None:
            _update_running_stats(mean, invstd, counts, eps, momentum, running_mean,
                                  running_var, num_batches_tracked)  # fmt: skip
    ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
    if count == 0:
        return torch.empty_like(x)
    return kernels.batch_norm_elemt(
        x, _param(weight, x, acc), _param(bias, x, acc), mean, invstd, eps
    )


def _update_running_stats(mean, invstd, counts, eps, momentum, running_mean, running_var,
                          num_batches_tracked):  # fmt: skip
    """BatchNorm's running-statistics update, in the statistics' dtype, without host syncs."""
    num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average: 1 / num_batches_tracked, on the device
        factor = num_batches_tracked.to(mean.dtype).reciprocal()
    else:
        factor = momentum
    total = counts.sum()
    var = invstd.pow(-2).sub_(eps).mul_(total / (total - 1))  # unbiased
    with torch.no_grad():
        running_mean.copy_(running_mean.to(mean.dtype).lerp_(mean, factor))
        running_var.copy_(running_var.to(var.dtype).lerp_(var, factor))


def backward(ctx, grad_output):
    kernels = _kernels()
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    weight_dtype, bias_dtype = ctx.param_dtypes
    if ctx.group_empty or ctx.saved_tensors[0].numel() == 0:
        x = ctx.saved_tensors[0]
        packed = torch.zeros(2 * ctx.num_channels, dtype=ctx.acc, device=x.device)
        dist.all_reduce(packed, group=ctx.group)  # joined, so that peers do not hang
        zeros = lambda dtype: x.new_zeros(ctx.num_channels, dtype=dtype)  # noqa: E731
        return (
            torch.zeros_like(x) if need_input else None,
            zeros(weight_dtype) if need_weight else None,
            zeros(bias_dtype) if need_bias else None,
        )
    x, weight, mean, invstd, counts = ctx.saved_tensors
    dy = as_layout_of(grad_output, x)
    weight = _param(weight, x, ctx.acc)
    # sum_dy / sum_dy_xmu are always computed: the all-reduce carries them for every process.
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = kernels.batch_norm_backward_reduce(
        dy, x, mean, invstd, weight, True, need_weight, need_bias
    )
    packed = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(packed, group=ctx.group)  # the backward's one collective
    grad_input = None
    if need_input:
        sum_dy, sum_dy_xmu = packed.split(ctx.num_channels)
        w = weight if weight is None or weight.dtype == mean.dtype else weight.to(mean.dtype)
        grad_input = kernels.batch_norm_backward_elemt(
            dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts
        )
    # weight None: the channels-last kernel returns 0-element tensors, not None
    grad_weight = grad_weight.to(weight_dtype) if need_weight and weight is not None else None
    grad_bias = grad_bias.to(bias_dtype) if need_bias and weight is not None else None
    return grad_input, grad_weight, grad_bias
