"""The training loader ``--resume`` can continue exactly: detectron2's, with batches made by a
:class:`~.samplers.ResumableBatchSampler` and images mapped by a
:class:`~.seeded_map.SeededMapDataset`.

Same inputs and semantics as ``detectron2.data.build_detection_train_loader`` (dataset dicts,
mapper, training sampler, aspect-ratio grouping, workers), but every batch is fixed in the main
process before it is dispatched (torch's ``DataLoader`` with a ``batch_sampler`` returns them
in order), and every image's augmentations are seeded by its position. Batch ``i`` of a process
is then the same for any ``NUM_WORKERS`` and after ``--resume`` at ``i``; it equals detectron2's
with ``NUM_WORKERS 0`` in which images are grouped (detectron2's batches depend on the worker
count: it groups images in the order its workers interleave them).
"""

import torch
from detectron2.data import DatasetFromList
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import DataLoader

from ..utils.seeds import derived_seed
from .samplers import ResumableBatchSampler, aspect_ratio_groups
from .seeded_map import SeededMapDataset

__all__ = ["build_resumable_train_loader"]

_LOADER_KEY = 0  # derived_seed(seed, rank, 0): the DataLoader's own generator


def build_resumable_train_loader(
    dataset,
    *,
    mapper,
    sampler,
    total_batch_size,
    seed,
    aspect_ratio_grouping=True,
    num_workers=0,
    collate_fn=None,
):
    """A ``DataLoader`` of this process's batches (lists of mapped dicts), in iteration order.

    Args:
        dataset (list[dict]): detectron2 dataset dicts (with ``width`` / ``height`` when
            grouping by aspect ratio).
        mapper, sampler, total_batch_size, aspect_ratio_grouping, num_workers, collate_fn: as
            in ``build_detection_train_loader`` (``sampler`` is required: a training sampler).
        seed: base of the per-image augmentation seeds, the same in every process and launch
            for ``--resume`` to be exact (``cfg.SEED``).

    The loader's ``batch_sampler`` is the :class:`ResumableBatchSampler`: call its
    ``start_at(iteration)`` before iterating the loader to continue a run.
    """
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"Total batch size ({total_batch_size}) must be divisible by the number of "
            f"processes ({world_size})"
        )
    groups = aspect_ratio_groups(dataset) if aspect_ratio_grouping else None
    batch_sampler = ResumableBatchSampler(
        sampler, total_batch_size // world_size, groups, seed=seed
    )
    generator = torch.Generator()  # the workers' base seed, not a draw from the global RNG
    generator.manual_seed(derived_seed(seed, comm.get_rank(), _LOADER_KEY))
    return DataLoader(
        SeededMapDataset(DatasetFromList(dataset, copy=False), mapper),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
        worker_init_fn=worker_init_reset_seed,
        generator=generator,
    )
