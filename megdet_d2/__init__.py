"""megdet_d2: MegDet (Peng et al., CVPR 2018) for Detectron2.

Public API is re-exported here; importing the package also registers CGBN and the LR policy
into Detectron2 (see the imports marked "registration").
"""
from .config import add_megdet_config

__all__ = ["add_megdet_config"]
