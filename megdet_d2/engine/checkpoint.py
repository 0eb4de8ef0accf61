"""``MegDetCheckpointer``: detectron2's checkpointer with atomic saves and strict shapes.

* A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
  into place; ``last_checkpoint`` is updated the same way, only after that. A process killed
  during a save leaves the previous checkpoint (and ``last_checkpoint`` pointing at it), never a
  truncated file that ``--resume`` would pick up.
* Loading a checkpoint whose tensor shapes do not fit the model is an error naming the keys
  (detectron2 only logs a warning and trains those tensors from scratch), unless
  ``strict_shapes=False`` (``MEGDET.STRICT_SHAPES``), e.g. to fine-tune with another number of
  classes.
* Loading a checkpoint that provides fewer than half of the model's learned tensors (weights and
  biases, BN statistics aside), e.g. a torchvision ResNet whose names match nothing in a
  detectron2 model, is an error unless ``allow_partial=True`` (``MEGDET.ALLOW_PARTIAL_WEIGHTS``):
  detectron2 would log the missing keys and train from scratch with exit status 0.
* Temporary files left by a process killed during a save are removed when the next
  checkpointer that saves to the folder starts, and before each save.
"""

import os
import re
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..errors import ConfigError

__all__ = ["MegDetCheckpointer", "atomic_write", "remove_stale_temporaries"]

_SHOWN = 3  # mismatched tensors named in the error (then "and N more")
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")  # atomic_write's ".<name>.<pid>.tmp"
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BN buffers, not learned
_STALE_AFTER_S = 24 * 3600  # older than this: stale even if its pid is in use again


def _temporary_name(path):
    return os.path.join(
        os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp"
    )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder):
    """Remove ``atomic_write`` temporaries in ``folder`` whose writer is gone (its pid is not
    running here, or the file is a day old). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMPORARY.match(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        path = os.path.join(folder, name)
        try:
            stale = (
                not _pid_alive(int(match.group(1))) or now - os.stat(path).st_mtime > _STALE_AFTER_S
            )
            if stale:
                os.unlink(path)
                removed.append(name)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    return removed


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary binary file, then rename it to ``path`` atomically.

    Readers see either the old ``path`` or the complete new one; on an exception the
    temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(path) or "."
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class MegDetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic local saves, (by default) strict shapes, and an
    error for a checkpoint that provides under half of the model's tensors."""

    def __init__(self, model, save_dir="", *, strict_shapes=True, allow_partial=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict_shapes = strict_shapes
        self.allow_partial = allow_partial
        if self.save_to_disk and self.save_dir and self._local():
            self._remove_stale_temporaries()

    def _remove_stale_temporaries(self):
        removed = remove_stale_temporaries(self.save_dir)
        if removed:
            self.logger.info(f"Removed temporaries of interrupted saves: {removed}")

    def _local(self):
        return "://" not in self.save_dir

    def save(self, name, **kwargs):
        if not self._local():  # remote storage: whatever its PathManager handler does
            return super().save(name, **kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self._remove_stale_temporaries()
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.strict_shapes and incompatible.incorrect_shapes:
            wrong = incompatible.incorrect_shapes
            mismatches = ", ".join(
                f"{key} {tuple(ckpt)} in the checkpoint vs {tuple(model)} in the model"
                for key, ckpt, model in wrong[:_SHOWN]
            ) + (f" and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else "")
            raise ConfigError(
                f"checkpoint shapes do not fit the model: {mismatches}; load a checkpoint of "
                "this model, or set MEGDET.STRICT_SHAPES False to train those tensors from "
                "scratch (e.g. fine-tuning with another number of classes)"
            )
        if not self.allow_partial:
            self._check_enough_loaded(incompatible)
        return incompatible

    def _check_enough_loaded(self, incompatible):
        """At least half of the model's learned tensors must be in the checkpoint with the right
        shape. BN statistics do not count: ImageNet checkpoints such as MSRA's R-50.pkl fold
        them into the affine weights (their backbone is 75 % of an R50-FPN Faster R-CNN's
        learned tensors, but under half of its tensors with the statistics)."""
        expected = [k for k in self.model.state_dict() if not k.endswith(_STATISTICS)]
        missing = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        loaded = sum(k not in missing for k in expected)
        if 2 * loaded >= len(expected):
            return
        unexpected = list(incompatible.unexpected_keys)
        names = (
            f"; it holds e.g. {unexpected[:_SHOWN]} where the model has e.g. "
            f"{[k for k in expected if k in missing][:_SHOWN]}"
            if unexpected
            else ""
        )
        raise ConfigError(
            f"the checkpoint provides {loaded} of the model's {len(expected)} learned tensors"
            f"{names}: "
            "it is not a checkpoint of this model (a torchvision or other codebase's file "
            "needs converting to detectron2 names); give a matching one, or set "
            "MEGDET.ALLOW_PARTIAL_WEIGHTS True to fine-tune from the tensors that match"
        )
