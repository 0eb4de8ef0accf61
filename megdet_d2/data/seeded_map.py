"""A dataset that maps each image under its own seed, wherever (whichever worker) it runs.

Detectron2's mappers draw their augmentations (``RandomFlip``, ``ResizeShortestEdge``'s size
choice, crops) from the global Python / NumPy / torch random generators of the process that
maps. :class:`SeededMapDataset` seeds all three from the image's :class:`~.samplers.Sample`
seed before calling the mapper, and restores them after, so an image's augmentation depends on
its position in the stream only: not on the DataLoader worker, their number, or what was
loaded before (a resumed run included), and mapping in the main process (``NUM_WORKERS 0``)
leaves the training loop's own random draws untouched.
"""

import contextlib
import itertools
import logging
import random

import numpy as np
import torch
from detectron2.utils.serialize import PicklableWrapper
from torch.utils.data import Dataset

__all__ = ["SeededMapDataset", "seeded_rngs"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed Python's, NumPy's and torch's (CPU) global generators; restore them on exit."""
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


def _identity(x):
    return x


class SeededMapDataset(Dataset):
    """``self[sample] = mapper(dataset[sample.index])`` with the generators seeded from
    ``sample.seed``.

    Like detectron2's ``MapDataset``, an image the mapper rejects (returns None) is replaced by
    another one drawn at random, here from the sample's seed, so the replacement is
    reproducible too.
    """

    def __init__(self, dataset, mapper):
        self._dataset = dataset
        # None: the dataset dicts themselves; a lambda works with spawned workers too
        self._mapper = PicklableWrapper(mapper if mapper is not None else _identity)

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, sample):
        index = sample.index
        with seeded_rngs(sample.seed):
            replacements = random.Random(sample.seed)
            for retry in itertools.count():
                data = self._mapper(self._dataset[index])
                if data is not None:
                    return data
                if retry == 3:
                    logger.warning(f"The mapper rejected image {sample.index} and 3 replacements")
                index = replacements.randrange(len(self._dataset))
