"""What does the start-up data check cost at COCO scale? (``megdet_d2/data/coco_check.py``)

Writes a synthetic COCO-2017-train-sized instances json (118,287 images, ~7.3 annotations per
image with a 48-coordinate polygon each, like COCO's ~450 MB file) and one hard link per image
to a few small PNGs (real ``stat`` calls, no disk space), then times, in this process:

* ``json.load`` of the whole file (what any COCO reader, e.g. detectron2's, pays);
* ``check_coco_dataset`` as the launcher runs it, and its parts: parsing with the polygons
  emptied (they are ~70 % of the text and no check reads them), the record checks, one ``stat``
  per image file, and the header sample (``HEADER_SAMPLE`` images);
* optionally (``--detectron2``) detectron2's ``load_coco_json`` of the same file, which every
  training process (and the launcher, when a schedule preset counts the images) runs anyway.

    python benchmarks/bench_data_check.py [--images 118287] [--detectron2]
    python benchmarks/bench_data_check.py --json instances_train2017.json --image-root train2017
"""

import argparse
import gc
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from megdet_d2.data import coco_check


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_dataset(folder, num_images, anns_per_image, coords, seed=0):
    """COCO-like json (streamed, so writing it needs little memory) + hard-linked images."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(folder, "train2017")
    os.makedirs(image_dir)
    sources = []  # one per 50,000 links (ext4 allows 65,000 per file)
    for k in range(num_images // 50000 + 1):
        sources.append(os.path.join(folder, f"source{k}.png"))
        Image.new("RGB", (64, 48), (90, 120, 30)).save(sources[-1])
    json_file = os.path.join(folder, "instances_train2017.json")
    counts = rng.poisson(anns_per_image, size=num_images)
    ann_id = 0
    with open(json_file, "w") as f:
        f.write('{"info": {"description": "synthetic"}, "images": [')
        for i in range(num_images):
            name = f"{i + 1:012d}.jpg"
            os.link(sources[i // 50000], os.path.join(image_dir, name))
            record = {"id": i + 1, "file_name": name, "width": 64, "height": 48}
            f.write(("," if i else "") + json.dumps(record))
        f.write('], "annotations": [')
        for i in range(num_images):
            for _ in range(counts[i]):
                ann_id += 1
                x, y = rng.uniform(0, 40, size=2).round(2)
                polygon = rng.uniform(0, 48, size=coords).round(2).tolist()
                record = {
                    "id": ann_id, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                    "bbox": [float(x), float(y), 12.5, 9.25], "area": 115.6, "iscrowd": 0,
                    "segmentation": [polygon],
                }  # fmt: skip
                f.write(("," if ann_id > 1 else "") + json.dumps(record))
        categories = [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in range(1, 81)]
        f.write('], "categories": ' + json.dumps(categories) + "}")
    return json_file, image_dir, ann_id


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=118287)
    parser.add_argument("--anns-per-image", type=float, default=7.3)
    parser.add_argument("--coords", type=int, default=48, help="polygon coordinates")
    parser.add_argument("--detectron2", action="store_true", help="also time load_coco_json")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--json", default=None, help="an existing COCO json instead")
    parser.add_argument("--image-root", default=None, help="its images (with --json)")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="bench_data_check_", dir=args.dir)
    try:
        if args.json:
            json_file, image_dir = args.json, args.image_root
        else:
            (json_file, image_dir, _), t_write = timed(
                write_dataset, folder, args.images, args.anns_per_image, args.coords
            )
            print(f"(synthetic dataset written in {t_write:.0f} s)")
        rss0 = _rss_mib()
        summary, t_total = timed(coco_check.check_coco_dataset, json_file, image_dir)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the check's
        rss_after = _rss_mib()

        gc.disable()  # the parts, as check_coco_dataset runs them
        data, t_load = timed(coco_check._load_json, json_file)
        cats, t_cats = timed(coco_check._check_categories, data, json_file)
        (images, ids), t_images = timed(coco_check._check_images, data, json_file)
        (_, anns), t_anns = timed(coco_check._check_annotations, data, json_file, cats, ids)
        size_mb = os.path.getsize(json_file) / 1e6
        print(f"json: {len(images)} images, {anns} annotations, {size_mb:.0f} MB")
        _, t_files = timed(coco_check._check_files, images, image_dir, json_file)
        _, t_headers = timed(
            coco_check._check_headers, images, image_dir, json_file, coco_check.HEADER_SAMPLE
        )
        del data, images, ids
        gc.enable()
        coco_check._release_memory()
        with open(json_file) as f:
            _, t_json = timed(json.load, f)
        coco_check._release_memory()
        rows = [
            ("parse with polygons emptied", t_load),
            ("record checks (categories, images, annotations)", t_cats + t_images + t_anns),
            (f"stat of {summary['images']} image files", t_files),
            (f"header sample ({coco_check.HEADER_SAMPLE} images, PIL open)", t_headers),
            ("**check_coco_dataset, total** (= start-up added)", t_total),
            ("for comparison: json.load of the whole file (what any COCO reader pays)", t_json),
        ]
        if args.detectron2:
            from detectron2.data.datasets import load_coco_json

            dicts, t_d2 = timed(load_coco_json, json_file, image_dir, "bench_data_check")
            rows.append(("for comparison: detectron2's load_coco_json, in every process", t_d2))
            del dicts
        print(f"summary: {summary}")
        print("\n| step | seconds |\n|---|---:|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} |")
        print(f"\ncheck_coco_dataset's RSS: {rss0:.0f} MiB before, peak {peak:.0f} MiB, "
              f"{rss_after:.0f} MiB after (the json is freed and returned to the OS)")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
