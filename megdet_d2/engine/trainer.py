"""``MegDetTrainer``: detectron2's ``DefaultTrainer`` with MegDet's model and LR scheduler, that
also runs multi-process on CPU.

It builds the model with sub-linear memory when ``MEGDET.SUBLINEAR_MEMORY`` (paper §3.3) and the
LR scheduler with MegDet's registry (``megdet_d2.build_lr_scheduler``: linear scaling + warmup).

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
``DistributedDataParallel`` rejects for CPU modules, so ``DefaultTrainer`` cannot train with
several CPU (gloo) processes. ``create_ddp_model`` here leaves ``device_ids`` unset for CPU models
and defers to detectron2 otherwise. ``MegDetTrainer`` uses it, and writes metrics every
``cfg.MEGDET.LOG_PERIOD`` iterations, with the Table 1 sample statistics (``MEGDET.SAMPLE_STATS``)
and, optionally, the gradient norm (``MEGDET.LOG_GRAD_NORM``) and the gradient noise scale
(``MEGDET.NOISE_SCALE``).

For long runs it also: saves checkpoints atomically and refuses ones whose shapes do not fit
(``MegDetCheckpointer``) or that load under half of the model; on ``--resume`` continues the
data stream exactly where it stopped (``build_resumable_train_loader``: the batches and
augmentations of iteration ``i`` depend on (SEED, rank, i) only, whatever the aspect-ratio
grouping held back and for any ``NUM_WORKERS``) and, with ``SEED >= 0``, seeds every
iteration's other draws (RPN / ROI sampling) from (SEED, rank, iteration), so the resumed run's
losses and weights equal the uninterrupted run's bit for bit on CPU; rewrites ``metrics.json``
so that each iteration appears once; writes strict JSON (``null`` for a non-finite metric);
names the LR when a loss becomes non-finite; and names the image file when the data loader
cannot read one (a ``ConfigError``, one line, no traceback).
"""

import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections import defaultdict

from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.engine import train_loop as d2_train_loop
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import (
    CommonMetricPrinter,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
)
from detectron2.utils.file_io import PathManager

from ..data import ResumableBatchSampler, build_resumable_train_loader
from ..errors import ConfigError
from ..modeling import apply_sublinear_memory
from ..solver import build_lr_scheduler
from ..utils.seeds import derived_seed
from .checkpoint import MegDetCheckpointer, atomic_write
from .hooks import GradNormHook, NoiseScaleHook, SampleStatsHook
from .supervise import reports_to_launcher

__all__ = [
    "MegDetJSONWriter",
    "MegDetTrainer",
    "NamedImageErrors",
    "create_ddp_model",
    "quiet_console_tracebacks",
]


class _TrainLoopTraceback(logging.Filter):
    """Detectron2's train loop logs "Exception during training:" with its traceback as soon as
    a step fails. The worker's report (``supervise.run_worker``) says the same: drop the log
    record for a ``ConfigError`` (reported as one line, no traceback) everywhere, and, with
    ``console=True``, any record's traceback on the console of a worker that reports to the
    launcher (the launcher prints the root cause's; the log file keeps every one)."""

    def __init__(self, console=False):
        super().__init__()
        self.console = console

    def filter(self, record):
        if not record.exc_info:
            return True
        if isinstance(record.exc_info[1], ConfigError):
            return False
        return not (self.console and reports_to_launcher())


logging.getLogger(d2_train_loop.__name__).addFilter(_TrainLoopTraceback())


def quiet_console_tracebacks(logger_name="detectron2"):
    """In a worker that reports to the launcher, keep exception tracebacks off the console
    handlers of ``logger_name`` (detectron2's ``setup_logger`` made them); call after it."""
    for handler in logging.getLogger(logger_name).handlers:  # its log files: streams too
        if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
            handler.addFilter(_TrainLoopTraceback(console=True))


class NamedImageErrors:
    """A dataset mapper whose failures to read an image (missing, undecodable, or not the size
    the json says) are a one-line ``ConfigError`` naming the file. The start-up check reads
    only a sample of image headers; the other images are checked here, when first read."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except (OSError, SizeMismatchError, SyntaxError) as e:  # PIL: OSError / SyntaxError
            text = str(e).strip().splitlines()
            raise ConfigError(
                f"image {dataset_dict.get('file_name')!r} (image_id "
                f"{dataset_dict.get('image_id')}) cannot be used: {type(e).__name__}: "
                f"{text[0] if text else ''}; replace the file, or fix or remove its entry in "
                "the dataset's json"
            ) from None


class MegDetJSONWriter(JSONWriter):
    """Detectron2's ``JSONWriter`` that writes strict JSON (a non-finite value, e.g. the AP of
    a model without detections, is ``null``, not ``NaN``) and can drop the records of the
    iterations a resumed run is about to log again."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size=window_size)
        self._path = json_file

    def write(self):
        storage = get_event_storage()
        to_save = defaultdict(dict)
        for k, (v, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:  # not written yet
                to_save[itr][k] = v if math.isfinite(v) else None
        if to_save:
            self._last_write = max(to_save)
        for itr, scalars in sorted(to_save.items()):
            scalars["iteration"] = itr
            self._file_handle.write(json.dumps(scalars, sort_keys=True, allow_nan=False) + "\n")
        self._file_handle.flush()
        with contextlib.suppress(AttributeError, OSError):
            os.fsync(self._file_handle.fileno())

    def drop_from(self, iteration):
        """Remove the records of ``iteration`` and later (and lines cut short by a kill),
        rewriting the file atomically; returns how many were removed."""
        if "://" in self._path:
            return 0
        self._file_handle.flush()
        kept, dropped = [], 0
        with open(self._path) as f:
            for line in f:
                try:
                    keep = json.loads(line).get("iteration", -1) < iteration
                except (ValueError, AttributeError):  # a partial line: the kill cut it
                    keep = False
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += bool(line.strip())
        if dropped:
            self._file_handle.close()
            atomic_write(self._path, lambda f: f.write("".join(kept).encode()))
            self._file_handle = PathManager.open(self._path, "a")
        return dropped


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
    """``DefaultTrainer`` with MegDet's model (sub-linear memory) and LR scheduler, whose model
    wrapping also works for CPU models (gloo), and which writes metrics every
    ``cfg.MEGDET.LOG_PERIOD`` iterations."""

    def __init__(self, cfg):
        checkpointer = functools.partial(
            MegDetCheckpointer,
            strict_shapes=cfg.MEGDET.STRICT_SHAPES,
            allow_partial=cfg.MEGDET.ALLOW_PARTIAL_WEIGHTS,
        )  # atomic saves; shape mismatches and checkpoints of other models are errors
        with _patched_defaults(
            create_ddp_model=create_ddp_model, DetectionCheckpointer=checkpointer
        ):
            super().__init__(cfg)
        # DefaultTrainer's inner SimpleTrainer calls after_backward on its own (empty) hook
        # list: run this trainer's hooks there (GradNormHook, NoiseScaleHook need the gradients).
        self._trainer.after_backward = self.after_backward

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model; with ``MEGDET.SUBLINEAR_MEMORY`` the backbone's activations are
        recomputed in the backward pass (paper §3.3)."""
        model = super().build_model(cfg)
        if cfg.MEGDET.SUBLINEAR_MEMORY:
            logging.getLogger("megdet_d2").info(
                f"Sub-linear memory: checkpointing {len(apply_sublinear_memory(model))} modules"
            )
        return model

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """MegDet's registered schedulers (linear scaling + warmup), else detectron2's."""
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_checkpointer(cls, cfg, model):
        """The checkpointer training uses, for ``model`` (e.g. to load it for ``--eval-only``)."""
        return MegDetCheckpointer(
            model,
            save_dir=cfg.OUTPUT_DIR,
            strict_shapes=cfg.MEGDET.STRICT_SHAPES,
            allow_partial=cfg.MEGDET.ALLOW_PARTIAL_WEIGHTS,
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader (its dataset dicts, mapper, sampler and grouping), made
        resumable: see :func:`~megdet_d2.data.build_resumable_train_loader`."""
        kwargs = build_detection_train_loader.from_config(cfg)
        kwargs["mapper"] = NamedImageErrors(kwargs["mapper"])
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

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader; an unreadable image is a one-line error naming it."""
        mapper = NamedImageErrors(DatasetMapper(cfg, False))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    def resume_or_load(self, resume=True):
        """Also continue the data stream at the checkpointed run's next iteration, and drop
        from ``metrics.json`` the iterations this run will log (again)."""
        super().resume_or_load(resume=resume)
        self._drop_metrics_from(self.start_iter)
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

    def _drop_metrics_from(self, iteration):
        """A run starting at ``iteration`` logs it and every later one: remove what an earlier
        (killed, or other) run in this OUTPUT_DIR logged for them, so each appears once."""
        # build_writers made them (on the main process only: the others write no metrics)
        for writer in getattr(self, "_megdet_writers", ()):
            if isinstance(writer, MegDetJSONWriter):
                dropped = writer.drop_from(iteration)
                if dropped:
                    logging.getLogger(__name__).info(
                        f"metrics.json: removed {dropped} records of iterations >= "
                        f"{iteration} written by an earlier run (this run logs them)"
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
        ``MEGDET.LOG_PERIOD`` iterations (detectron2: over the last 20), so with
        ``MEGDET.LOG_PERIOD 1`` it holds every iteration's values (a resumed run's records then
        equal the full run's)."""
        PathManager.mkdirs(self.cfg.OUTPUT_DIR)
        self._megdet_writers = [
            CommonMetricPrinter(self.max_iter),
            MegDetJSONWriter(
                os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"),
                window_size=self.cfg.MEGDET.LOG_PERIOD,
            ),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]
        return self._megdet_writers

    def build_hooks(self):
        ret = super().build_hooks()
        # DefaultTrainer hard-codes a PeriodicWriter of period 20: the same writers (made once,
        # by build_writers), every MEGDET.LOG_PERIOD iterations instead.
        ret = [
            (
                hooks.PeriodicWriter(self._megdet_writers, period=self.cfg.MEGDET.LOG_PERIOD)
                if isinstance(hook, hooks.PeriodicWriter)
                else hook
            )
            for hook in ret
        ]
        if self.cfg.MEGDET.SAMPLE_STATS:  # Table 1; every process, before the writer
            writer = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            images = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            ret.insert(writer[0] if writer else len(ret), SampleStatsHook(images))
        if self.cfg.MEGDET.LOG_GRAD_NORM:  # before the writer, like the sample statistics
            writer = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            ret.insert(writer[0] if writer else len(ret), GradNormHook())
        if self.cfg.MEGDET.NOISE_SCALE:  # a collective every log period: before the writer
            writer = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            batch = self.cfg.SOLVER.IMS_PER_BATCH
            noise_scale = NoiseScaleHook(
                batch // comm.get_world_size(),
                batch,
                ema=self.cfg.MEGDET.NOISE_SCALE_EMA,
                period=self.cfg.MEGDET.LOG_PERIOD,
            )
            ret.insert(writer[0] if writer else len(ret), noise_scale)
        return ret
