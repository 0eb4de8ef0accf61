"""Cross-GPU batch normalisation (CGBN, MegDet §3.3, Algorithm 1).

``CGBN`` is an ``nn.BatchNorm2d`` whose training-mode statistics are those of all samples in a
process group, as if one BatchNorm2d saw the group's concatenated batch. Each layer call costs
exactly one collective in forward and one in backward (the paper's Algorithm 1 uses two in
forward; here count, sum and sum of squares travel in one tensor).

CPU (gloo) design, chosen for speed with torch's CPU kernels (the training-mode BN kernel and
``var_mean`` over (0, 2, 3) are slow there):

* forward: per-channel sum and sum of squares of the local batch with fast contiguous
  reductions (``sum`` and ``linalg.vector_norm`` over H*W, no temporaries); if a channel's
  mean is large against its spread (``mean^2 > 16 var``), the sums are recomputed about the
  local mean so that fp32 cancellation cannot destroy the variance (mean 1e4 / std 1 stays
  accurate). ``[count, sum, sum of squares]`` is promoted to fp64 and summed with ONE
  ``all_reduce`` (unequal and empty batches weigh by count); the group mean and biased
  variance follow in fp64, and the output comes from the fast eval-mode kernel
  ``batch_norm(x, weight, bias, mean, var, training=False)``.
* backward: torch's eval-mode BN backward kernel gives ``sum(dy)`` and ``sum(dy * xhat)`` in one
  fused, mean-subtracting pass; ONE ``all_reduce`` of both; then
  ``grad_input = a * dy + b * x + c`` per channel in two vectorised passes. ``grad_weight`` and
  ``grad_bias`` are local sums, as in ``nn.SyncBatchNorm``; DDP's gradient averaging completes
  them.

CUDA (NCCL) design: torch's fused kernels (``batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``) around one ``all_gather`` of per-rank ``[mean, invstd, count]``
in forward and one ``all_reduce`` in backward.

Statistics are always computed in fp32 (fp64 for fp64 inputs), also under autocast and for
fp16 / bf16 inputs; the output has the input's dtype and memory format. A process with an empty
batch still joins both collectives (its empty output stays connected to the graph through the
affine weight, so ``out.sum().backward()`` reaches the layer); if the whole group is empty the
output is empty and the running statistics are left unchanged.

Activation checkpointing (sub-linear memory, ``megdet_d2.modeling.sublinear``) reruns forwards in
backward; under a :class:`StatisticsTape` the rerun reuses the first pass's group statistics
instead of issuing its collective again.
"""

import contextlib
import threading

import torch
import torch.distributed as dist
import torch.nn as nn

from .groups import get_cgbn_group
from .norm_registry import NORM_REGISTRY

__all__ = ["CGBN", "StatisticsTape"]

# A channel whose |mean| exceeds this many standard deviations gets its sums recomputed about
# the local mean (fp32 sums of squares lose ~ eps * (mean / std)^2 relative precision).
_SHIFT_RATIO_SQ = 16.0


# The StatisticsTape recording or replaying on this thread (activation checkpointing), if any.
_TAPE = threading.local()


class StatisticsTape:
    """The group statistics of one forward pass, reused when activation checkpointing reruns it.

    Under ``with tape.record():`` every CGBN forward collective runs and its result is stored;
    under ``with tape.replay():`` the same CGBN calls, in the same order, take the stored
    results instead of communicating. A recomputation thus issues no collective (no extra
    traffic, no deadlock when processes recompute different blocks) and normalises with exactly
    the first pass's statistics. Used by ``megdet_d2.modeling.sublinear``.
    """

    def __init__(self):
        self._results = []
        self._next = None  # index of the next result to replay; None = recording

    def _run(self, result, collective):
        """Run ``collective`` (which fills ``result``) and record, or replay into ``result``."""
        if self._next is None:
            collective()
            self._results.append(result.clone())
            return
        if self._next >= len(self._results):
            raise RuntimeError("CGBN: recomputation made more CGBN calls than the recorded pass")
        result.copy_(self._results[self._next])
        self._next += 1

    @contextlib.contextmanager
    def _active(self, next_index):
        previous = getattr(_TAPE, "tape", None)
        _TAPE.tape, self._next = self, next_index
        try:
            yield self
        finally:
            _TAPE.tape = previous

    def record(self):
        """Context: run and store this thread's CGBN forward collectives."""
        return self._active(None)

    def replay(self):
        """Context: replay the stored results, from the first, instead of communicating."""
        return self._active(0)


def _forward_collective(result, collective):
    """The forward's one collective (``collective()`` fills ``result``), via an active tape."""
    tape = getattr(_TAPE, "tape", None)
    if tape is None:
        collective()
    else:
        tape._run(result, collective)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def _contiguous(t):
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _like(t, ref):
    """``t`` in the memory format of ``ref`` (grad_output may arrive with any strides)."""
    if ref.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def _local_sums_cpu(x, dtype):
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
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average
        return 1.0 / float(num_batches_tracked)
    return momentum


def _no_autocast(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check_total(total):
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 over the CGBN group"
        )


class _CGBNFunction(torch.autograd.Function):
    """Group-synchronised batch norm over ``process_group`` (size > 1), one collective each way."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, group
    ):
        x = _contiguous(x)
        forward = _forward_cuda if x.is_cuda else _forward_cpu
        args = (ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps)
        with _no_autocast(x.device.type):  # statistics in fp32 whatever autocast says
            return forward(*args, momentum, group)

    @staticmethod
    def backward(ctx, grad_output):
        with _no_autocast(grad_output.device.type):
            if ctx.is_cuda:
                grads = _backward_cuda(ctx, grad_output)
            else:
                grads = _backward_cpu(ctx, grad_output)
        return grads + (None,) * 6


def _forward_cpu(
    ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, group
):
    num_channels = x.shape[1]
    dtype = _stat_dtype(x)
    count = x.numel() // num_channels if num_channels else 0
    if count > 0:
        s1, s2 = _local_sums_cpu(x, dtype)
        packed = torch.cat([s1.new_full((1,), count), s1, s2])
    else:  # joins the collective with zeros, so that peers do not hang
        packed = torch.zeros(2 * num_channels + 1, dtype=torch.float64)
    # the forward's one collective
    _forward_collective(packed, lambda: dist.all_reduce(packed, group=group))
    total = int(packed[0])
    _check_total(total)
    ctx.is_cuda = False
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


def _backward_cpu(ctx, grad_output):
    x, weight, mean, var, invstd = ctx.saved_tensors
    num_channels = x.shape[1]
    if ctx.total == 0 or x.numel() == 0:  # join the collective with zeros; zero gradients
        packed = torch.zeros(2 * num_channels, dtype=_stat_dtype(x))
        dist.all_reduce(packed, group=ctx.group)
        grad_wb = packed.new_zeros(num_channels) if ctx.has_weight else None
        return torch.zeros_like(x), grad_wb, None if grad_wb is None else grad_wb.clone()
    # fp16 / bf16: the whole backward runs in fp32, grad_input is cast back at the end.
    x_dtype = x.dtype
    x = x.to(mean.dtype)
    dy = _like(grad_output, x).to(mean.dtype)
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


def _forward_cuda(
    ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, group
):
    num_channels = x.shape[1]
    world_size = dist.get_world_size(group)
    if x.numel() > 0:
        mean, invstd = torch.batch_norm_stats(x, eps)
        count = torch.full((1,), x.numel() // num_channels, dtype=mean.dtype, device=x.device)
        combined = torch.cat([mean, invstd, count])
    else:
        # Joins the collective with count 0; its (zero) statistics are filtered out below.
        combined = torch.zeros(2 * num_channels + 1, dtype=torch.float32, device=x.device)
        if x.dtype == torch.float64:
            combined = combined.double()
    gathered = torch.empty(world_size, combined.numel(), dtype=combined.dtype, device=x.device)

    def gather():  # the forward's one collective
        if dist.get_backend(group) == dist.Backend.GLOO:
            dist.all_gather(list(gathered.unbind(0)), combined, group=group)
        else:
            dist.all_gather_into_tensor(gathered, combined, group=group)

    _forward_collective(gathered, gather)
    mean_all, invstd_all, count_all = gathered.split(num_channels, dim=1)
    counts = count_all.view(-1)
    keep = counts > 0
    total = int(counts.sum().item())  # one host sync, as in nn.SyncBatchNorm's masking
    _check_total(total)
    ctx.is_cuda = True
    ctx.group = group
    ctx.total = total
    ctx.has_weight = weight is not None
    if total == 0:
        ctx.save_for_backward(x, None, None, None, None)
        return torch.empty_like(x)
    factor = 0.0
    if running_mean is not None:
        factor = _momentum_factor(momentum, num_batches_tracked)
        counts_rs = counts[keep].to(running_mean.dtype)
    else:
        counts_rs = counts[keep]
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        x, mean_all[keep], invstd_all[keep], running_mean, running_var, factor, eps, counts_rs
    )
    ctx.save_for_backward(x, weight, mean, invstd, counts[keep].to(torch.int32))
    if x.numel() == 0:
        return torch.empty_like(x)
    return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)


def _backward_cuda(ctx, grad_output):
    x, weight, mean, invstd, counts = ctx.saved_tensors
    num_channels = x.shape[1]
    local = ctx.total > 0 and x.numel() > 0
    grad_input = grad_weight = grad_bias = None
    if local:
        dy = _like(grad_output, x)
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, True, ctx.has_weight, ctx.has_weight
        )
        packed = torch.cat([sum_dy, sum_dy_xmu])
    else:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        packed = torch.zeros(2 * num_channels, dtype=dtype, device=x.device)
    dist.all_reduce(packed, group=ctx.group)  # the backward's one collective
    if not local:
        grad_input = torch.zeros_like(x)
        if ctx.has_weight:
            grad_weight = torch.zeros(num_channels, device=x.device)
            grad_bias = torch.zeros(num_channels, device=x.device)
        return grad_input, grad_weight, grad_bias
    sum_dy, sum_dy_xmu = packed.split(num_channels)
    if weight is not None and weight.dtype != mean.dtype:
        weight = weight.to(mean.dtype)
    grad_input = torch.batch_norm_backward_elemt(
        dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts
    )
    return grad_input, grad_weight, grad_bias


@NORM_REGISTRY.register()
class CGBN(nn.BatchNorm2d):
    """BatchNorm2d with statistics over all samples of a process group (MegDet's CGBN).

    A subclass of ``nn.BatchNorm2d`` so that optimizer parameter grouping, fvcore's PreciseBN
    and checkpoints treat it as BatchNorm. In eval mode, or when the group has one process (or
    ``torch.distributed`` is not initialised) it is exactly ``nn.BatchNorm2d``, with no
    communication.

    Args:
        process_group: group whose samples are normalised together; ``None`` (default) means
            the group configured at start-up, ``groups.get_cgbn_group()``, looked up per call.
        Other arguments are those of ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _group(self):
        """The process group to synchronise over, or None when there is nothing to sync."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else get_cgbn_group()
        if group is None or dist.get_world_size(group) <= 1:
            return None
        return group

    def forward(self, input):
        self._check_input_dim(input)
        group = self._group() if self.training else None
        if group is None:
            return super().forward(input)
        return _CGBNFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.num_batches_tracked if self.track_running_stats else None,
            self.eps,
            self.momentum,
            group,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # detectron2's FrozenBatchNorm2d (version 3) has running stats but no
        # num_batches_tracked; default it to 0 as BatchNorm does for its own version < 2.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            if (prefix + "running_mean") in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self):
        return super().extra_repr() + (
            f", process_group={self.process_group}" if self.process_group is not None else ""
        )
