"""CGBN's CPU half (gloo): one all-reduce of ``[count, sum, sum of squares]`` in forward, one of
``[sum(dy), sum(dy * xhat)]`` in backward.

Designed for speed with torch's CPU kernels (the training-mode BN kernel and ``var_mean`` over
(0, 2, 3) are slow there):

* forward: per-channel sum and sum of squares of the local batch with fast contiguous
  reductions (``sum`` and ``linalg.vector_norm`` over H*W, no temporaries); if a channel's
  mean is large against its spread (``mean^2 > 16 var``) the sums are recomputed about the
  local mean, so that fp32 cancellation cannot destroy the variance (mean 1e4 / std 1 stays
  accurate). The packed sums are promoted to fp64 and all-reduced (unequal and empty batches
  weigh by count); the group mean and biased variance follow in fp64, and the output comes
  from the fast eval-mode kernel ``batch_norm(x, weight, bias, mean, var, training=False)``.
* backward: torch's eval-mode BN backward kernel gives ``sum(dy)`` and ``sum(dy * xhat)`` in one
  fused, mean-subtracting pass; after the all-reduce ``grad_input = a * dy + b * x + c`` per
  channel in two vectorised passes. ``grad_weight`` / ``grad_bias`` are local sums, as in
  ``nn.SyncBatchNorm``; DDP's gradient averaging completes them.
"""

import torch
import torch.distributed as dist

from ..modeling.statistics_tape import forward_collective
from .cgbn_common import as_layout_of, check_total, stat_dtype

__all__ = ["backward", "forward"]

# A channel whose |mean| exceeds this many standard deviations gets its sums recomputed about
# the local mean (fp32 sums of squares lose ~ eps * (mean / std)^2 relative precision).
_SHIFT_RATIO_SQ = 16.0


def _channel_view(t):
    """``t`` as ``(N*C, H*W)`` for NCHW-contiguous input, else ``(N*H*W, C)`` (no copy)."""
    n, c = t.shape[:2]
    if t.is_contiguous():
        return t.view(n * c, -1)
    return t.permute(0, 2, 3, 1).reshape(-1, c)  # channels_last: a view


def _per_channel(rows, t):
    """Fold per-row results of ``_channel_view(t)`` into per-channel totals."""
    if t.is_contiguous():
        return rows.view(t.shape[0], t.shape[1]).sum(0)
    return rows


def _channel_sum(t):
    v = _channel_view(t)
    return _per_channel(v.sum(-1 if t.is_contiguous() else 0), t)


def _channel_sumsq(t):
    """Per-channel sum of squares, in fp64."""
    # vector_norm reduces without materialising t * t and is the fastest option at all shapes.
    norms = torch.linalg.vector_norm(_channel_view(t), dim=-1 if t.is_contiguous() else 0)
    return _per_channel(norms.double().square(), t)


def _local_sums(x, dtype):
    """Local ``(sum, sum of squares)`` per channel, in fp64; stable for |mean| >> std."""
    xs = x if x.dtype == dtype else x.to(dtype)
    count = x.numel() // x.shape[1]
    s1 = _channel_sum(xs).double()
    s2 = _channel_sumsq(xs)
    # mean^2 > R var  <=>  (R + 1) s1^2 > R n s2: recompute about the local mean, where fp32
    # sums of squares of (x - shift) are accurate.
    if bool(((_SHIFT_RATIO_SQ + 1) * s1 * s1 > (_SHIFT_RATIO_SQ * count) * s2).any()):
        shift = (s1 / count).to(dtype)
        y = xs - shift.view(1, -1, 1, 1)
        d1 = _channel_sum(y).double()
        d2 = _channel_sumsq(y)
        shift = shift.double()
        s1 = count * shift + d1
        s2 = d2 + 2 * shift * d1 + count * shift * shift
    return s1, s2


def _momentum_factor(momentum, num_batches_tracked):
    """BatchNorm's exponential-average factor; increments ``num_batches_tracked``."""
    num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average
        return 1.0 / float(num_batches_tracked)
    return momentum


def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum,
            group):  # fmt: skip
    num_channels = x.shape[1]
    dtype = stat_dtype(x)
    count = x.numel() // num_channels if num_channels else 0
    if count > 0:
        s1, s2 = _local_sums(x, dtype)
        packed = torch.cat([s1.new_full((1,), count), s1, s2])
    else:  # joins the collective with zeros, so that peers do not hang
        packed = torch.zeros(2 * num_channels + 1, dtype=torch.float64)
    forward_collective(packed, lambda: dist.all_reduce(packed, group=group))
    total = int(packed[0])
    check_total(total)
    ctx.group = group
    ctx.total = total
    ctx.has_weight = weight is not None
    ctx.eps = eps
    if total == 0:
        ctx.save_for_backward(x, None, None, None, None)
        return torch.empty_like(x)
    mean64, sq64 = (packed[1:] / total).split(num_channels)
    var64 = torch.addcmul(sq64, mean64, mean64, value=-1).clamp_(min=0)
    if running_mean is not None:
        factor = _momentum_factor(momentum, num_batches_tracked)
        with torch.no_grad():
            running_mean.lerp_(mean64.to(running_mean.dtype), factor)
            running_var.lerp_((var64 * (total / (total - 1))).to(running_var.dtype), factor)
    mean, var = mean64.to(dtype), var64.to(dtype)
    w = weight.to(dtype) if weight is not None else None
    b = bias.to(dtype) if bias is not None else None
    ctx.save_for_backward(x, w, mean, var, torch.rsqrt(var + eps))
    if count == 0:
        return torch.empty_like(x)
    return torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, False)


def backward(ctx, grad_output):
    x, weight, mean, var, invstd = ctx.saved_tensors
    num_channels = x.shape[1]
    if ctx.total == 0 or x.numel() == 0:  # join the collective with zeros; zero gradients
        packed = torch.zeros(2 * num_channels, dtype=stat_dtype(x))
        dist.all_reduce(packed, group=ctx.group)
        grad_wb = packed.new_zeros(num_channels) if ctx.has_weight else None
        return torch.zeros_like(x), grad_wb, None if grad_wb is None else grad_wb.clone()
    # fp16 / bf16: the whole backward runs in fp32, grad_input is cast back at the end.
    x_dtype = x.dtype
    x = x.to(mean.dtype)
    dy = as_layout_of(grad_output, x).to(mean.dtype)
    # torch's eval-mode BN backward kernel: sum(dy) and sum(dy * (x - mean)) * invstd in one
    # fused, mean-subtracting pass (stable for |mean| >> std; faster here than sum + bmm).
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, mean, var, None, None, False, ctx.eps, [False, True, True]
    )
    packed = torch.cat([sum_dy, sum_dy_xhat])
    dist.all_reduce(packed, group=ctx.group)  # the backward's one collective
    # grad_input = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = a * dy + b * x + c
    g_mean_dy, g_mean_dy_xhat = (packed / ctx.total).split(num_channels)
    a = invstd if weight is None else weight * invstd
    b = (a * invstd).mul_(g_mean_dy_xhat).neg_()
    c = torch.addcmul(a * g_mean_dy, mean, b).neg_()
    # Eval-mode batch_norm with mean 0, var 1, eps 0 computes x * b + c in one fast pass.
    grad_input = torch.batch_norm(
        x, b, c, torch.zeros_like(mean), torch.ones_like(mean), False, 0.0, 0.0, False
    )
    grad_input.addcmul_(dy, a.view(1, -1, 1, 1))
    grad_weight, grad_bias = (sum_dy_xhat, sum_dy) if ctx.has_weight else (None, None)
    return grad_input.to(x_dtype), grad_weight, grad_bias
