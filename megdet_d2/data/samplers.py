"""A training sampler that resumes where an interrupted run stopped reading.

Detectron2's training samplers yield an infinite, seeded stream of indices per process and
start it from the beginning on every launch, so ``--resume`` after iteration ``i`` reads again
the images of iterations ``0..i``. :class:`ResumableSampler` wraps any such sampler and skips
the indices this process has already consumed; the trainer sets how many with
:meth:`ResumableSampler.skip` after loading the checkpoint, before the loader is iterated.
"""

import itertools

from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "find_resumable_sampler"]


class ResumableSampler(Sampler):
    """Yield ``sampler``'s indices, less the first ``n`` set by :meth:`skip`."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def skip(self, n):
        """Start the stream at this process's ``n``-th index (takes effect at the next iter)."""
        self.start = int(n)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


def find_resumable_sampler(loader):
    """The :class:`ResumableSampler` inside a detectron2 train loader, or None.

    Follows ``.dataset`` through the wrappers detectron2 builds (``AspectRatioGroupedDataset``
    -> ``DataLoader`` -> ``ToIterableDataset``, which holds the sampler).
    """
    obj = loader
    while obj is not None:
        if isinstance(getattr(obj, "sampler", None), ResumableSampler):
            return obj.sampler
        obj = getattr(obj, "dataset", None)
    return None
