"""COCO evaluation reporting both mmAP and mmAR, as the paper does.

Detectron2's ``COCOEvaluator`` keeps only the six AP numbers of ``COCOeval.stats``; the paper
also reports mmAR (average recall over IoU .50:.95 with 100 detections per image). This subclass
adds the recall half of ``stats`` and writes every number to ``<output_dir>/coco_metrics.json``
as strict JSON: a number COCO cannot compute (every one when the model detected nothing, APs
when there are no small objects) is ``null`` there, not ``NaN``, and a model without
detections prints a line saying so instead of ``mmAP = nan``. A test set without ground truth in
the evaluated images is a ``ConfigError`` (one line, exit status 2 under ``train_net.py``),
never a table of ``nan`` and status 0.

Backend: detectron2's C++ ``COCOeval_opt`` when it is built; otherwise faster-coco-eval's
``COCOeval_faster`` when installed (``benchmarks/bench_coco_eval.py``: the same 12 numbers as
pycocotools to 1e-16, about 10x faster); otherwise pycocotools.
"""

import contextlib
import json
import math
import os

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..errors import ConfigError

__all__ = ["MegDetCOCOEvaluator", "strict_json"]

# Positions of the recall numbers in COCOeval.stats, per iou_type.
_RECALL_STATS = {
    "bbox": {"AR@1": 6, "AR@10": 7, "AR": 8, "ARs": 9, "ARm": 10, "ARl": 11},
    "segm": {"AR@1": 6, "AR@10": 7, "AR": 8, "ARs": 9, "ARm": 10, "ARl": 11},
    "keypoints": {"AR": 5, "AR50": 6, "AR75": 7, "ARm": 8, "ARl": 9},
}


def strict_json(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None (JSON ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _fmt(value):
    return f"{value:.2f}" if math.isfinite(value) else "n/a (no ground truth)"


def _faster_coco_eval():
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


@contextlib.contextmanager
def _fast_cocoeval(cocoeval_cls):
    """Make detectron2's evaluator use ``cocoeval_cls`` as its fast COCOeval, in this block."""
    original = d2_coco.COCOeval_opt
    d2_coco.COCOeval_opt = cocoeval_cls
    try:
        yield
    finally:
        d2_coco.COCOeval_opt = original


class MegDetCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` + average recall: ``AR`` is mmAR (AR@100, IoU .50:.95), ``AP`` is mmAP."""

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, **kwargs):
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        self._faster = None
        if kwargs.get("use_fast_impl", True) and not self._use_fast_impl:
            # detectron2's C++ evaluator is not built: use faster-coco-eval if installed.
            self._faster = _faster_coco_eval()
            self._use_fast_impl = self._faster is not None

    def _eval_predictions(self, predictions, img_ids=None):
        if self._faster is None:
            return super()._eval_predictions(predictions, img_ids=img_ids)
        with _fast_cocoeval(self._faster):
            return super()._eval_predictions(predictions, img_ids=img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None and all(value < 0 for value in coco_eval.stats):
            # COCOeval's -1 everywhere: no (non-crowd) ground truth in the evaluated images.
            # The start-up check refuses such a test set; reached e.g. through img_ids.
            raise ConfigError(
                f"DATASETS.TEST {self._metadata.name!r}: COCO {iou_type} evaluation found no "
                f"(non-crowd) ground truth in the {len(coco_eval.params.imgIds)} evaluated "
                "image(s), so every metric is undefined; evaluate on annotated images (or "
                "remove the json's 'annotations' key to only write predictions)"
            )
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        recall = _RECALL_STATS[iou_type]
        if coco_eval is None:  # detectron2 evaluates nothing: every number is NaN
            results.update({name: float("nan") for name in recall})
            self._logger.info(
                f"{iou_type}: no detections on {self._metadata.name}, so mmAP and mmAR are "
                "undefined (null in coco_metrics.json)"
            )
            return results
        stats = coco_eval.stats
        results.update(
            {
                name: float(stats[i] * 100) if stats[i] >= 0 else float("nan")
                for name, i in recall.items()
            }
        )
        self._logger.info(
            f"{iou_type}: mmAP = {_fmt(results['AP'])}, mmAR = {_fmt(results['AR'])} "
            "(IoU .50:.95, 100 detections per image)"
        )
        return results

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if results and self._output_dir and comm.is_main_process():
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "coco_metrics.json")
            with PathManager.open(path, "w") as f:
                json.dump(strict_json(results), f, indent=2, allow_nan=False)
            self._logger.info(f"Wrote COCO metrics to {path}")
        return results
