"""Convert the batch-norm layers of an existing model to CGBN."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .cgbn import CGBN

__all__ = ["convert_to_cgbn"]

# nn.BatchNorm2d covers detectron2's BatchNorm2d (an alias) and NaiveSyncBatchNorm (a subclass).
_CONVERTIBLE = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def convert_to_cgbn(module, process_group=None):
    """Replace every ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, ``NaiveSyncBatchNorm`` and
    ``FrozenBatchNorm2d`` in ``module`` (including ``module`` itself) by :class:`CGBN`.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: affine parameters, running statistics,
    ``eps``, ``momentum``, the affine / track-running-stats flags, device, dtype, training mode
    and ``requires_grad`` are kept, so eval-mode outputs are unchanged. CGBN layers are left as
    they are. A ``FrozenBatchNorm2d`` becomes a CGBN with *trainable* weight and bias (momentum
    0.1): MegDet's point is to train BN rather than freeze it. Freeze it again explicitly if
    that is not wanted.

    Args:
        module (nn.Module): model or layer to convert (modified in place).
        process_group: passed to each CGBN; None means the start-up CGBN group.

    Returns:
        nn.Module: the converted module (a new object if ``module`` itself was converted).
    """
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, CGBN):
        return _to_cgbn(module, process_group)
    for name, child in module.named_children():
        new_child = convert_to_cgbn(child, process_group)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _to_cgbn(bn, process_group):
    frozen = isinstance(bn, FrozenBatchNorm2d)
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    cgbn = CGBN(
        bn.num_features,
        eps=bn.eps,
        momentum=0.1 if frozen else bn.momentum,
        affine=True if frozen else bn.affine,
        track_running_stats=True if frozen else bn.track_running_stats,
        process_group=process_group,
    )
    if ref is not None:
        cgbn.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if cgbn.affine:
            cgbn.weight.copy_(bn.weight)
            cgbn.bias.copy_(bn.bias)
            if not frozen:
                cgbn.weight.requires_grad_(bn.weight.requires_grad)
                cgbn.bias.requires_grad_(bn.bias.requires_grad)
        if cgbn.track_running_stats:
            cgbn.running_mean.copy_(bn.running_mean)
            cgbn.running_var.copy_(bn.running_var)
            if not frozen:
                cgbn.num_batches_tracked.copy_(bn.num_batches_tracked)
    cgbn.train(bn.training)
    if hasattr(bn, "qconfig"):
        cgbn.qconfig = bn.qconfig
    return cgbn
