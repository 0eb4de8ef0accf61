"""Sub-linear memory (MegDet §3.3; Chen et al., "Training deep nets with sublinear memory cost").

``apply_sublinear_memory(model)`` makes every trainable ResNet block and stem (detectron2
``CNNBlockBase``) and every normalised FPN lateral / output conv keep only its input during the
forward pass and recompute its activations in backward (``torch.utils.checkpoint``,
non-reentrant). Parameter names, the state dict and the module tree are unchanged: only the
instances' ``forward`` is replaced, so checkpoints load either way.

A recomputed forward must not act twice (pytorch#62471, #96136; fairscale#694):

* BN / CGBN running statistics: every ``_BatchNorm`` inside the block has its running mean,
  variance and ``num_batches_tracked`` restored after the recomputation, so they are updated
  exactly once per iteration, by the first pass.
* CGBN collectives: the first pass records each CGBN layer's reduced statistics on a
  :class:`~megdet_d2.modeling.statistics_tape.StatisticsTape` and the recomputation replays
  them: no second collective per layer (nothing that could mismatch across processes) and the
  same statistics.

Plain BatchNorm recomputes its batch statistics from the same input, which gives the same
values; gradients equal the non-checkpointed model's (tests/test_sublinear.py).
"""

import contextlib
import functools
import types

import torch
from detectron2.layers import CNNBlockBase
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.modeling.backbone import FPN
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .statistics_tape import StatisticsTape

__all__ = ["apply_sublinear_memory", "checkpoint_module", "is_checkpointed", "uncheckpoint_module"]


def _batch_norms(module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _recomputing(tape, batch_norms):
    """Replay CGBN statistics; leave BN running statistics as the first pass left them."""
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in batch_norms]  # fmt: skip
    try:
        with tape.replay():
            yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(batch_norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _contexts(module):
    """``context_fn`` for ``checkpoint``: (first forward, recomputation) context managers."""
    tape = StatisticsTape()
    return tape.record(), _recomputing(tape, _batch_norms(module))


def _checkpointed_forward(self, *args, **kwargs):
    forward = functools.partial(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(
        forward,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(_contexts, self),
        **kwargs,
    )


def is_checkpointed(module):
    """Whether ``module``'s forward was replaced by :func:`checkpoint_module`."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def checkpoint_module(module):
    """Make ``module`` (in training mode, with grad enabled) recompute its activations in
    backward; BN-aware as described in the module docstring. Returns ``module``."""
    if "forward" in module.__dict__ and not is_checkpointed(module):
        raise ValueError(f"{type(module).__name__} already has a per-instance forward")
    module.forward = types.MethodType(_checkpointed_forward, module)
    return module


def uncheckpoint_module(module):
    """Undo :func:`checkpoint_module`."""
    if is_checkpointed(module):
        del module.forward
    return module


def _trainable(module):
    return any(p.requires_grad for p in module.parameters())


def apply_sublinear_memory(model):
    """Checkpoint the trainable ResNet blocks / stem and the FPN's normalised convs of ``model``.

    Frozen blocks (``MODEL.BACKBONE.FREEZE_AT``) keep no activations anyway and are left alone;
    an FPN conv without a trained norm saves nothing worth recomputing. Call before wrapping the
    model in DistributedDataParallel. Returns the names of the checkpointed modules.
    """
    names = []
    fpn_convs = set()
    for module in model.modules():
        if isinstance(module, FPN):
            fpn_convs.update(
                id(c)
                for c in [*module.lateral_convs, *module.output_convs]
                if isinstance(c, D2Conv2d) and c.norm is not None and _trainable(c.norm)
            )
    for name, module in model.named_modules():
        if (isinstance(module, CNNBlockBase) or id(module) in fpn_convs) and _trainable(module):
            checkpoint_module(module)
            names.append(name)
    return names
