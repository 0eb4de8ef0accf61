"""Is faster-coco-eval identical to pycocotools, and faster? (Decides the COCO evaluation backend.)

Builds a synthetic COCO ground truth and noisy detections, evaluates box AP/AR with both, and
prints the 12 ``stats`` side by side with the wall time of evaluate + accumulate + summarize.

    python benchmarks/bench_coco_eval.py --images 2000
"""

import argparse
import contextlib
import io
import time

import numpy as np


def synthetic(num_images, num_classes=80, seed=0):
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        for _ in range(int(rng.integers(1, 8))):
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            w, h = rng.uniform(8, 140), rng.uniform(8, 100)
            cat = int(rng.integers(1, num_classes + 1))
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
            for _ in range(3):  # a good, a poor and a wrong-class detection
                jitter = rng.normal(0, 0.15 * min(w, h), size=4)
                box = [
                    x + jitter[0],
                    y + jitter[1],
                    max(1.0, w + jitter[2]),
                    max(1.0, h + jitter[3]),
                ]
                c = cat if rng.uniform() < 0.8 else int(rng.integers(1, num_classes + 1))
                dets.append(
                    {"image_id": image_id, "category_id": c, "bbox": box,
                     "score": float(rng.uniform())}
                )  # fmt: skip
    cats = [{"id": i, "name": str(i)} for i in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def run(coco_cls, eval_cls, gt, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        start = time.perf_counter()
        ev = eval_cls(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        seconds = time.perf_counter() - start
    return np.array(ev.stats[:12]), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    gt, dets = synthetic(args.images)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ref, t_ref = run(COCO, COCOeval, gt, dets)
    try:
        from faster_coco_eval import COCO as FCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        print(f"pycocotools: {t_ref:.2f} s; faster-coco-eval is not installed")
        return
    fast, t_fast = run(FCOCO, COCOeval_faster, gt, dets)
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm"]
    names.append("ARl")
    print(f"{args.images} images, {len(gt['annotations'])} boxes, {len(dets)} detections\n")
    print("| stat | pycocotools | faster-coco-eval | abs diff |\n|---|---|---|---|")
    for n, a, b in zip(names, ref, fast):
        print(f"| {n} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    print(f"| **time (s)** | {t_ref:.2f} | {t_fast:.2f} | speed-up {t_ref / t_fast:.1f}x |")


if __name__ == "__main__":
    main()
