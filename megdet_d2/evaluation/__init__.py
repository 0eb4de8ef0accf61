from .coco import MegDetCOCOEvaluator

__all__ = ["MegDetCOCOEvaluator"]
