"""MegDet layers: CGBN, its process groups, the norm registry and BN-to-CGBN conversion.

Importing this package registers ``"CGBN"`` and makes every Detectron2 norm key accept the names
in :data:`NORM_REGISTRY` (see :func:`install_norm_registry`).
"""

from .cgbn import CGBN
from .convert import convert_to_cgbn
from .groups import check_group_size, create_cgbn_groups, get_cgbn_group
from .norm_registry import NORM_REGISTRY, get_norm, install_norm_registry, known_norm_names

install_norm_registry()

__all__ = [
    "CGBN",
    "NORM_REGISTRY",
    "check_group_size",
    "convert_to_cgbn",
    "create_cgbn_groups",
    "get_cgbn_group",
    "get_norm",
    "install_norm_registry",
    "known_norm_names",
]
