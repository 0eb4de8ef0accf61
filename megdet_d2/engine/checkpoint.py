"""``MegDetCheckpointer``: detectron2's checkpointer with atomic saves and strict shapes.

* A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
  into place; ``last_checkpoint`` is updated the same way, only after that. A process killed
  during a save leaves the previous checkpoint (and ``last_checkpoint`` pointing at it), never a
  truncated file that ``--resume`` would pick up.
* Loading a checkpoint whose tensor shapes do not fit the model is an error naming the keys
  (detectron2 only logs a warning and trains those tensors from scratch), unless
  ``strict_shapes=False`` (``MEGDET.STRICT_SHAPES``), e.g. to fine-tune with another number of
  classes.
"""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["MegDetCheckpointer", "atomic_write"]

_SHOWN = 3  # mismatched tensors named in the error (then "and N more")


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary binary file, then rename it to ``path`` atomically.

    Readers see either the old ``path`` or the complete new one; on an exception the
    temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
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
    """``DetectionCheckpointer`` with atomic local saves and (by default) strict shapes."""

    def __init__(self, model, save_dir="", *, strict_shapes=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict_shapes = strict_shapes

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
            raise ValueError(
                f"checkpoint shapes do not fit the model: {mismatches}; load a checkpoint of "
                "this model, or set MEGDET.STRICT_SHAPES False to train those tensors from "
                "scratch (e.g. fine-tuning with another number of classes)"
            )
        return incompatible
