"""The synchronised batch-norm autograd Function behind ``CGBN`` (as torch's ``_functions.py``).

``CGBNFunction`` normalises with the mean and biased variance of all samples of a process group
(size > 1) and costs exactly one collective in forward and one in backward (MegDet's
Algorithm 1 uses two in forward; here everything a forward needs travels in one tensor). The
arithmetic lives in two halves with the same contract:

* ``cgbn_cpu``: gloo, CPU kernels (``[count, sum, sum of squares]`` all-reduced in fp64);
* ``cgbn_cuda``: NCCL (or gloo with CUDA tensors), torch's fused CUDA batch-norm kernels around
  one all-gather of per-process ``[mean, invstd, count]``.

Common to both: statistics in fp32 (fp64 for fp64 input) whatever the input dtype, the module's
dtype or autocast; output in the input's dtype and memory format; unequal batches weigh by
count; a process with an empty batch still joins both collectives; a whole group with no sample
returns an empty output and leaves the running statistics alone; an activation-checkpointing
rerun replays the first pass's statistics (``megdet_d2.modeling.statistics_tape``).
"""

import contextlib

import torch

from . import cgbn_cpu, cgbn_cuda
from .cgbn_common import contiguous

__all__ = ["CGBNFunction"]


def _no_autocast(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class CGBNFunction(torch.autograd.Function):
    """Group-synchronised batch norm over ``group`` (size > 1), one collective each way."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, group
    ):
        x = contiguous(x)  # NCHW or channels_last, as both halves' kernels expect
        half = cgbn_cuda if cgbn_cuda.takes(x) else cgbn_cpu
        ctx.half = half
        with _no_autocast(x.device.type):  # statistics in fp32 whatever autocast says
            return half.forward(
                ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps,
                momentum, group,
            )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_output):
        with _no_autocast(grad_output.device.type):
            grads = ctx.half.backward(ctx, grad_output)
        return grads + (None,) * 6
