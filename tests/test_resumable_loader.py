"""The resumable training stream: batch ``i`` (its images, grouping and augmentations) is the
same after starting at ``i`` as in the uninterrupted stream, for any number of workers."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.structures import BoxMode
from PIL import Image

from megdet_d2.data import (
    ResumableBatchSampler,
    aspect_ratio_groups,
    build_resumable_train_loader,
    sample_seed,
)

SEED, BATCH = 7, 3

# 13 images, 8 landscape (group 0) and 5 portrait (group 1): grouping holds images back
SIZES = [(24, 16), (16, 24), (24, 16), (24, 16), (16, 24), (24, 16), (24, 16), (16, 24),
         (24, 16), (16, 24), (24, 16), (16, 24), (24, 16)]  # fmt: skip


def _dicts(image_dir=None):
    dicts = []
    for i, (w, h) in enumerate(SIZES):
        d = {"image_id": i, "width": w, "height": h}
        if image_dir is not None:
            d["file_name"] = str(image_dir / f"{i}.png")
            pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d["file_name"])
            box = [2, 3, 10, 12]
            d["annotations"] = [{"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]
        dicts.append(d)
    return dicts


def _batches(sampler, start, count):
    sampler.start_at(start)
    it = iter(sampler)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("kind", ["TrainingSampler", "RepeatFactorTrainingSampler"])
def test_batches_at_any_iteration_equal_the_uninterrupted_stream(kind):
    groups = aspect_ratio_groups(_dicts())
    assert groups.tolist().count(0) == 8 and groups.tolist().count(1) == 5

    def sampler():
        if kind == "TrainingSampler":
            indices = TrainingSampler(len(SIZES), seed=3)
        else:
            indices = RepeatFactorTrainingSampler(torch.linspace(1, 2.5, len(SIZES)), seed=3)
        return ResumableBatchSampler(indices, BATCH, groups, seed=SEED, rank=1)

    full = _batches(sampler(), 0, 40)
    for start in (1, 5, 6, 17, 29):
        assert _batches(sampler(), start, 8) == full[start : start + 8], start
    # the old resume (skip start x BATCH positions) would have started elsewhere at some start
    assert any(full[i][0].position != i * BATCH for i in (5, 6, 17, 29))
    for k, batch in enumerate(full[:30]):
        assert len({int(groups[s.index]) for s in batch}) == 1  # one orientation per batch
        for s in batch:
            assert s.seed == sample_seed(SEED, 1, s.position)
        # every position up to the last one read is read or held back: none skipped, and the
        # held-back ones (fewer than a batch, of one group) come later
        used = [s.position for b in full[: k + 1] for s in b]
        assert len(used) == len(set(used))
        pending = set(range(max(used) + 1)) - set(used)
        assert len(pending) < BATCH
        later = {s.position for b in full[k + 1 :] for s in b}
        assert pending <= later, (k, pending)
    assert sampler().seed == SEED and len({s.seed for b in full for s in b}) == 40 * BATCH


def _images(loader, count):
    it = iter(loader)
    out = [[(d["image_id"], d["image"], d["instances"].gt_boxes.tensor) for d in next(it)]
           for _ in range(count)]  # fmt: skip
    del it  # stop the workers
    return out


def test_loader_batches_are_the_same_for_any_worker_count_and_after_resuming(tmp_path):
    dicts = _dicts(tmp_path)
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[
            T.ResizeShortestEdge((12, 16, 20), max_size=40, sample_style="choice"),
            T.RandomFlip(),
        ],
        image_format="BGR",
    )

    def loader(workers, start=0):
        loader = build_resumable_train_loader(
            dicts, mapper=mapper, sampler=TrainingSampler(len(dicts), seed=3),
            total_batch_size=BATCH, seed=SEED, num_workers=workers,
        )  # fmt: skip
        loader.batch_sampler.start_at(start)
        return loader

    def global_draws():
        return np.random.rand(), torch.rand(1).item()

    # mapping in the main process leaves the global generators where they were
    np.random.seed(1)
    torch.manual_seed(1)
    expected = global_draws()
    np.random.seed(1)
    torch.manual_seed(1)
    full = _images(loader(0), 12)
    assert global_draws() == expected

    shapes = {tuple(img.shape) for b in full for _, img, _ in b}
    assert len(shapes) >= 4, shapes  # resize choices of both orientations
    boxes = {tuple(box[0].tolist()) for b in full for _, _, box in b}
    assert len(boxes) > 3  # flips and sizes move the one box of every image

    for workers, start in [(2, 0), (2, 5), (0, 7)]:
        got = _images(loader(workers, start), 12 - start)
        assert len(got) == len(full[start:])
        for k, (a, b) in enumerate(zip(got, full[start:]), start):
            assert [i for i, _, _ in a] == [i for i, _, _ in b], (workers, start, k)
            for (_, img_a, box_a), (_, img_b, box_b) in zip(a, b):
                assert torch.equal(img_a, img_b) and torch.equal(box_a, box_b), (workers, k)
