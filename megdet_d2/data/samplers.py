"""A training batch sampler whose batches are a function of (seed, rank, iteration).

Detectron2's train loader groups images by aspect ratio after loading them, in the order its
DataLoader workers return them, and draws augmentations (flip, resize choice) from per-worker
random streams. A resumed run can neither tell which images the grouping was holding back nor
continue the workers' streams, so its batches differ from the uninterrupted run's.

:class:`ResumableBatchSampler` makes both decisions in the main process, before any image is
read. It numbers the indices of a detectron2 training sampler's per-process stream by position
(their shuffling unchanged: ``TrainingSampler``, ``RepeatFactorTrainingSampler``, ...), gives
the image at position ``p`` the seed ``derived_seed(seed, rank, 2, p)`` for its augmentations,
and groups positions into batches as detectron2's ``AspectRatioGroupedDataset`` does (two
groups, width > height or not, from the dataset dicts' ``width`` / ``height``; a batch when a
group is full). Resuming at iteration ``i`` replays the grouping over indices and aspect ratios
only (no image is loaded) past the first ``i`` batches, so the images held back then are
pending exactly as in the uninterrupted run; no image is read twice or skipped.
"""

import itertools
from typing import NamedTuple

import numpy as np
from detectron2.utils import comm
from torch.utils.data import Sampler

from ..utils.seeds import derived_seed

__all__ = ["ResumableBatchSampler", "Sample", "aspect_ratio_groups", "sample_seed"]

_SAMPLE_KEY = 2  # derived_seed(seed, rank, 2, position); 0: the loader, 1: iterations


class Sample(NamedTuple):
    """One image of a batch: its dataset index, its position in this process's index stream
    and the seed of its augmentations."""

    index: int
    position: int
    seed: int


def sample_seed(seed, rank, position):
    """The augmentation seed of the image at ``position`` of process ``rank``'s stream."""
    return derived_seed(seed, rank, _SAMPLE_KEY, position)


def aspect_ratio_groups(dataset_dicts):
    """Per dataset index, detectron2's aspect-ratio group: 0 if width > height, else 1."""
    return np.array([0 if d["width"] > d["height"] else 1 for d in dataset_dicts], np.uint8)


class ResumableBatchSampler(Sampler):
    """Batches of :class:`Sample` for one process, from ``sampler``'s infinite index stream.

    Args:
        sampler: a detectron2 training sampler (the indices of this process).
        batch_size: images per batch of this process.
        groups: per dataset index, its aspect-ratio group (:func:`aspect_ratio_groups`); None:
            no grouping (consecutive positions, as detectron2 without grouping).
        seed: base of the per-image seeds (``cfg.SEED``, or a seed shared by the processes).
        rank: this process (default: detectron2's ``comm.get_rank()``).
    """

    def __init__(self, sampler, batch_size, groups=None, *, seed, rank=None):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.groups = groups
        self.seed = int(seed)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.start = 0

    def start_at(self, iteration):
        """Begin at this process's batch of ``iteration`` (takes effect at the next ``iter``)."""
        self.start = int(iteration)

    def _grouped_positions(self):
        """Batches of (position, index), grouped as ``AspectRatioGroupedDataset`` would."""
        buckets = {}
        for position, index in enumerate(self.sampler):
            group = 0 if self.groups is None else int(self.groups[index])
            bucket = buckets.setdefault(group, [])
            bucket.append((position, int(index)))
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[group] = []

    def __iter__(self):
        # The batches before `start` are replayed from indices alone: no seed, no image.
        for batch in itertools.islice(self._grouped_positions(), self.start, None):
            yield [
                Sample(index, pos, sample_seed(self.seed, self.rank, pos)) for pos, index in batch
            ]
