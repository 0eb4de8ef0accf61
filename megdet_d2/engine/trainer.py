"""``MegDetTrainer``: detectron2's ``DefaultTrainer`` that also runs multi-process on CPU.

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` rejects for CPU modules, so ``DefaultTrainer`` cannot train with
several CPU (gloo) processes. ``create_ddp_model`` here leaves ``device_ids`` unset for CPU models
and defers to detectron2 otherwise. ``MegDetTrainer`` uses it, and writes metrics every
``cfg.LOG_PERIOD`` iterations; nothing else differs from ``DefaultTrainer``.
"""

import contextlib

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks

__all__ = ["MegDetTrainer", "create_ddp_model"]

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """Like detectron2's ``create_ddp_model``; CPU models get DDP without ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _wrap_models_with(fn):
    """Make ``DefaultTrainer.__init__`` wrap its model with ``fn``, only inside this block."""
    d2_defaults.create_ddp_model = fn
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


class MegDetTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose model wrapping also works for CPU models (gloo), and which
    writes metrics every ``cfg.LOG_PERIOD`` iterations."""

    def __init__(self, cfg):
        with _wrap_models_with(create_ddp_model):
            super().__init__(cfg)

    def build_hooks(self):
        ret = super().build_hooks()
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.LOG_PERIOD  # DefaultTrainer hard-codes 20
        return ret
