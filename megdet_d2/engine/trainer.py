"""``MegDetTrainer``: detectron2's ``DefaultTrainer`` that also runs multi-process on CPU.

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` rejects for CPU modules, so ``DefaultTrainer`` cannot train with
several CPU (gloo) processes. ``create_ddp_model`` here leaves ``device_ids`` unset for CPU models
and defers to detectron2 otherwise. ``MegDetTrainer`` uses it, and writes metrics every
``cfg.LOG_PERIOD`` iterations, with the Table 1 sample statistics (``MEGDET.SAMPLE_STATS``).

For long runs it also: saves checkpoints atomically and refuses ones whose shapes do not fit
(``MegDetCheckpointer``); on ``--resume`` continues the data stream where it stopped
(``ResumableSampler``) and, with ``SEED >= 0``, seeds every iteration from (SEED, rank,
iteration) so the resumed losses equal the uninterrupted run's; and names the LR when a loss
becomes non-finite.
"""

import contextlib
import functools
import logging
import os

import numpy as np
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from ..data.samplers import ResumableSampler, find_resumable_sampler
from .checkpoint import MegDetCheckpointer
from .hooks import SampleStatsHook

__all__ = ["MegDetTrainer", "create_ddp_model"]

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """Like detectron2's ``create_ddp_model``; CPU models get DDP without ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _patched_defaults(**names):
    """Replace names in ``detectron2.engine.defaults`` (used by ``DefaultTrainer.__init__``),
    only inside this block."""
    saved = {name: getattr(d2_defaults, name) for name in names}
    for name, value in names.items():
        setattr(d2_defaults, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(d2_defaults, name, value)


def derived_seed(seed, rank, iteration=None):
    """A well-mixed 31-bit seed for (``cfg.SEED``, rank, iteration); ``None``: the loader's."""
    key = [seed, rank, 0] if iteration is None else [seed, rank, 1, iteration]
    return int(np.random.SeedSequence(key).generate_state(1)[0] >> 1)


class MegDetTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose model wrapping also works for CPU models (gloo), and which
    writes metrics every ``cfg.LOG_PERIOD`` iterations."""

    def __init__(self, cfg):
        checkpointer = functools.partial(
            MegDetCheckpointer, strict_shapes=cfg.MEGDET.STRICT_SHAPES
        )  # atomic saves; shape mismatches are errors
        with _patched_defaults(
            create_ddp_model=create_ddp_model, DetectionCheckpointer=checkpointer
        ):
            super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader, with its sampler wrapped so ``--resume`` can skip the
        images already read, and (``SEED >= 0``) a seeded ``DataLoader`` generator."""
        kwargs = build_detection_train_loader.from_config(cfg)
        if kwargs["sampler"] is not None:
            kwargs["sampler"] = ResumableSampler(kwargs["sampler"])
        if cfg.SEED >= 0:  # else the loader draws its worker seed from the global RNG
            kwargs["seed"] = derived_seed(cfg.SEED, comm.get_rank())
        return build_detection_train_loader(**kwargs)

    def resume_or_load(self, resume=True):
        """Also continue the data stream where the checkpointed run was (not at its start)."""
        super().resume_or_load(resume=resume)
        sampler = find_resumable_sampler(self._trainer.data_loader)
        if self.start_iter > 0 and sampler is not None:
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            sampler.skip(self.start_iter * per_process)
            logging.getLogger(__name__).info(
                f"Resuming at iteration {self.start_iter}: skipping the "
                f"{self.start_iter * per_process} images this process has already read"
            )

    def run_step(self):
        # With a fixed SEED, every random draw of an iteration (augmentation, RPN / ROI
        # sampling) depends on (SEED, rank, iteration) only, so a resumed run continues exactly
        # as the uninterrupted one would (with DATALOADER.NUM_WORKERS 0).
        if self.cfg.SEED >= 0:
            seed_all_rng(derived_seed(self.cfg.SEED, comm.get_rank(), self.iter))
        try:
            super().run_step()
        except FloatingPointError as e:  # detectron2's message lacks the LR
            groups = self._trainer.optimizer.param_groups
            lr = max(groups, key=lambda g: len(g["params"]))["lr"]  # as the LRScheduler hook
            raise FloatingPointError(
                f"{e}\nlr = {lr:.6g} at iteration {self.iter}: lower SOLVER.BASE_LR or lengthen "
                "SOLVER.WARMUP_ITERS"
            ) from None

    def build_writers(self):
        """Detectron2's writers, but each metrics.json record is the median over its own
        ``LOG_PERIOD`` iterations (detectron2: over the last 20), so with ``LOG_PERIOD 1`` it
        holds every iteration's values (a resumed run's records then equal the full run's)."""
        PathManager.mkdirs(self.cfg.OUTPUT_DIR)
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(
                os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), window_size=self.cfg.LOG_PERIOD
            ),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def build_hooks(self):
        ret = super().build_hooks()
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.LOG_PERIOD  # DefaultTrainer hard-codes 20
        if self.cfg.MEGDET.SAMPLE_STATS:  # Table 1; every process, before the writer
            writer = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            images = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            ret.insert(writer[0] if writer else len(ret), SampleStatsHook(images))
        return ret
