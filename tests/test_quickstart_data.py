"""The built-in dataset: real COCO json on disk, deterministic, registered with detectron2."""

import filecmp
import hashlib
import json
import multiprocessing as mp
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO

from megdet_d2 import add_megdet_config
from megdet_d2.data import (
    CLASSES,
    DIFFICULTY_DEFAULTS,
    SHAPES,
    TRAIN_NAME,
    VAL_NAME,
    generate_split,
    prepare_quickstart_data,
    register_quickstart_datasets,
)
from megdet_d2.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare(root):
    return prepare_quickstart_data(root, num_train=12, num_val=6, image_size=64, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, _prepare(root)


def test_json_loads_with_pycocotools_and_boxes_lie_inside_images(data):
    _, paths = data
    json_file, image_root = paths[TRAIN_NAME]
    coco = COCO(json_file)
    assert len(coco.getImgIds()) == 12
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 12  # at least one object per image
    for ann in anns:
        img = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0
        assert 0 <= x and x + w <= img["width"] and 0 <= y and y + h <= img["height"]
        with Image.open(os.path.join(image_root, img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) == (64, 64)


def test_same_seed_gives_identical_files_and_other_seed_differs(data, tmp_path):
    root, paths = data
    again = _prepare(str(tmp_path / "again"))
    for name in (TRAIN_NAME, VAL_NAME):
        (json_a, dir_a), (json_b, dir_b) = paths[name], again[name]
        assert filecmp.cmp(json_a, json_b, shallow=False)
        files = sorted(os.listdir(dir_a))
        assert files == sorted(os.listdir(dir_b))
        match, mismatch, errors = filecmp.cmpfiles(dir_a, dir_b, files, shallow=False)
        assert (len(match), mismatch, errors) == (len(files), [], [])
    other = prepare_quickstart_data(str(tmp_path / "other"), 12, 6, 64, seed=4)
    assert not filecmp.cmp(paths[TRAIN_NAME][0], other[TRAIN_NAME][0], shallow=False)


def test_splits_differ(data):
    _, paths = data
    with open(paths[TRAIN_NAME][0]) as f, open(paths[VAL_NAME][0]) as g:
        train, val = json.load(f), json.load(g)
    assert train["annotations"][:6] != val["annotations"][:6]


def test_concurrent_preparation_yields_one_complete_copy(tmp_path):
    root = str(tmp_path)
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare, [root, root])
    assert results[0] == results[1]
    assert [n for n in os.listdir(root) if n.startswith(".tmp")] == []
    assert len(COCO(results[0][VAL_NAME][0]).getImgIds()) == 6


def test_registered_through_detectron2(tmp_path):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.DATASETS.TRAIN = (TRAIN_NAME,)
    cfg.DATASETS.TEST = (VAL_NAME,)
    cfg.MEGDET.QUICKSTART.ROOT = str(tmp_path)
    cfg.MEGDET.QUICKSTART.NUM_TRAIN, cfg.MEGDET.QUICKSTART.NUM_VAL = 5, 3
    cfg.MEGDET.QUICKSTART.IMAGE_SIZE = 64
    register_quickstart_datasets(cfg)
    dicts = DatasetCatalog.get(VAL_NAME)
    assert len(dicts) == 3 and os.path.isfile(dicts[0]["file_name"])
    assert MetadataCatalog.get(VAL_NAME).thing_classes == list(CLASSES)
    assert len(DatasetCatalog.get(TRAIN_NAME)) == 5


def test_aspect_ratios_give_portrait_and_landscape_images(data):
    root, square = data
    paths = prepare_quickstart_data(root, 12, 6, 64, seed=3, aspect_ratios=(0.75, 1.5))
    assert paths[TRAIN_NAME][0] != square[TRAIN_NAME][0]  # another folder: settings never mix
    json_file, image_root = paths[TRAIN_NAME]
    coco = COCO(json_file)
    sizes = set()
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(os.path.join(image_root, img["file_name"])) as im:
            assert im.size == (img["width"], img["height"])
        sizes.add(im.size)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and x + w <= img["width"] and 0 <= y and y + h <= img["height"]
    assert sizes == {(48, 64), (64, 43)}  # width / height 0.75 and 1.5, longer side 64


def _digest(folder, coco):
    h = hashlib.sha256(json.dumps(coco, sort_keys=True).encode())
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.mark.parametrize(
    "aspect_ratios, expected",
    [
        ((1.0,), "b1c3b7196bb3daf75e4724493e1709b236b7eb035d4b0d06975d5a87ce2e1be3"),
        ((0.75, 1.5), "9722c35d382ecf2592dc590b2a4aa902a3f3aba72db361b8bfbb9a9456d722a8"),
    ],
)
def test_default_difficulty_draws_the_quickstart_data_byte_for_byte(
    tmp_path, aspect_ratios, expected
):
    """Hashes of the images and json drawn before the difficulty options existed."""
    coco = generate_split(str(tmp_path), 6, 128, 0, aspect_ratios=aspect_ratios)
    assert _digest(str(tmp_path), coco) == expected
    assert generate_split(str(tmp_path / "x"), 0, 128, 0, **DIFFICULTY_DEFAULTS)["categories"]


HARD = dict(num_classes=8, max_objects=10, object_size=(0.1, 0.35), max_overlap=0.4,
            clutter=12, noise=12.0)  # fmt: skip


def test_harder_data(tmp_path):
    paths = prepare_quickstart_data(
        str(tmp_path), 24, 4, 96, seed=0, aspect_ratios=(0.75, 1.5), **HARD
    )
    assert "numclasses8" in paths[TRAIN_NAME][0] and "clutter12" in paths[TRAIN_NAME][0]
    coco = COCO(paths[TRAIN_NAME][0])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert {a["category_id"] for a in anns} == set(range(1, 9))
    assert len(anns) / 24 > 4  # several objects per image
    assert min(a["bbox"][2] for a in anns) <= 10  # small objects (of 64-72 px shorter sides)
    sizes, overlapping = set(), 0
    for img in coco.loadImgs(coco.getImgIds()):
        sizes.add((img["width"], img["height"]))
        boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        for x, y, w, h in boxes:
            assert 0 <= x and x + w <= img["width"] and 0 <= y and y + h <= img["height"]
        overlapping += any(
            min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])
            and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])
            for i, a in enumerate(boxes) for b in boxes[:i]
        )  # fmt: skip
    assert sizes == {(72, 96), (96, 64)} and overlapping >= 3  # both orientations, overlaps
    with Image.open(os.path.join(paths[TRAIN_NAME][1], "000001.png")) as im:
        assert len(set(im.getdata())) > 1000  # clutter and noise, not flat colours


def test_harder_data_through_the_config(tmp_path):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "experiments", "shapes_hard_R18_FPN.yaml"))
    cfg.MEGDET.QUICKSTART.ROOT = str(tmp_path)
    cfg.MEGDET.QUICKSTART.NUM_TRAIN, cfg.MEGDET.QUICKSTART.NUM_VAL = 4, 2
    register_quickstart_datasets(cfg)
    assert MetadataCatalog.get(VAL_NAME).thing_classes == list(SHAPES)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(SHAPES)
    for key, value in (("NUM_CLASSES", 9), ("OBJECT_SIZE", [0.5, 0.2]), ("MAX_OVERLAP", 0.0)):
        bad = cfg.clone()
        bad.MEGDET.QUICKSTART[key] = value
        with pytest.raises(ConfigError, match=f"MEGDET.QUICKSTART.{key}="):
            register_quickstart_datasets(bad)
    for name in (TRAIN_NAME, VAL_NAME):  # leave the default registration to other tests
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
