"""``MegDetTrainer``: detectron2's ``DefaultTrainer`` that also runs multi-process on CPU.

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` rejects for CPU modules, so ``DefaultTrainer`` cannot train with
several CPU (gloo) processes. ``create_ddp_model`` here leaves ``device_ids`` unset for CPU models
and defers to detectron2 otherwise. ``MegDetTrainer`` uses it, and writes metrics every
``cfg.LOG_PERIOD`` iterations, with the Table 1 sample statistics (``MEGDET.SAMPLE_STATS``).

For long runs it also: saves checkpoints atomically and refuses ones whose shapes do not fit
(``MegDetCheckpointer``); on ``--resume`` continues the data stream exactly where it stopped
(``build_resumable_train_loader``: the batches and augmentations of iteration ``i`` depend on
(SEED, rank, i) only, whatever the aspect-ratio grouping held back and for any
``NUM_WORKERS``) and, with ``SEED >= 0``, seeds every iteration's other draws (RPN / ROI
sampling) from (SEED, rank, iteration), so the resumed run's losses and weights equal the
uninterrupted run's bit for bit on CPU; and names the LR when a loss becomes non-finite.
"""

import contextlib
import functools
import logging
import os

from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from ..data import ResumableBatchSampler, build_resumable_train_loader
from ..utils.seeds import derived_seed
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


_ITERATION_KEY = 1  # derived_seed(SEED, rank, 1, iteration): an iteration's draws


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
        """Detectron2's train loader (its dataset dicts, mapper, sampler and grouping), made
        resumable: see :func:`~megdet_d2.data.build_resumable_train_loader`."""
        kwargs = build_detection_train_loader.from_config(cfg)
        if not isinstance(kwargs["dataset"], list):  # a torch dataset: detectron2's loader
            logging.getLogger(__name__).warning(
                "The training set is not a list of dataset dicts: detectron2's train loader is "
                "used, and --resume does not continue its data stream exactly"
            )
            return build_detection_train_loader(**kwargs)
        # The per-image seeds must agree across processes and launches: SEED, or (SEED < 0,
        # no exact resume) one random seed shared by this launch's processes.
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_resumable_train_loader(**kwargs, seed=seed)

    def resume_or_load(self, resume=True):
        """Also continue the data stream at the checkpointed run's next iteration."""
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "batch_sampler", None)
        if self.start_iter > 0 and isinstance(sampler, ResumableBatchSampler):
            sampler.start_at(self.start_iter)
            logging.getLogger(__name__).info(
                f"Resuming the data stream at iteration {self.start_iter} (the batches and "
                "augmentations the uninterrupted run would have had from there)"
            )
            if self.cfg.SEED < 0:
                logging.getLogger(__name__).warning(
                    f"SEED={self.cfg.SEED}: this launch shuffles the images and draws "
                    "augmentations with new random seeds, so the resumed run does not continue "
                    "the interrupted one exactly; set SEED >= 0 (the same in every launch)"
                )

    def run_step(self):
        # With a fixed SEED, every random draw of an iteration outside data loading (RPN / ROI
        # sampling) depends on (SEED, rank, iteration) only, so a resumed run continues exactly
        # as the uninterrupted one would (the loader seeds each image's augmentations itself).
        if self.cfg.SEED >= 0:
            seed_all_rng(derived_seed(self.cfg.SEED, comm.get_rank(), _ITERATION_KEY, self.iter))
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
