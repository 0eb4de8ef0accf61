"""Helpers shared by CGBN's CPU and CUDA halves (``cgbn_cpu``, ``cgbn_cuda``)."""

import torch

__all__ = ["as_layout_of", "check_total", "contiguous", "stat_dtype"]


def stat_dtype(x):
    """The dtype statistics are computed in: fp64 for fp64 input, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def contiguous(t):
    """``t`` if NCHW- or channels_last-contiguous, else an NCHW-contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def as_layout_of(t, ref):
    """``t`` in the memory format of ``ref`` (grad_output may arrive with any strides)."""
    if ref.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def check_total(total):
    """BatchNorm's error for a single value per channel, counted over the whole group."""
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 over the CGBN group"
        )
