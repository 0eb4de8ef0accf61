"""Registry of normalization layers selectable by name in Detectron2 configs.

Detectron2 resolves norm names (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ...) with
``detectron2.layers.get_norm``, a fixed table without a registry. :func:`install_norm_registry`
makes that lookup consult :data:`NORM_REGISTRY` first, so a registered name (e.g. ``"CGBN"``)
works with the stock ``build_model`` wherever Detectron2 accepts a norm name.
"""

import sys

from fvcore.common.registry import Registry

__all__ = ["NORM_REGISTRY", "get_norm", "install_norm_registry", "known_norm_names"]

NORM_REGISTRY = Registry("NORM")
NORM_REGISTRY.__doc__ = """
Registry for normalization layers usable by name wherever Detectron2 accepts a norm name.

The registered object is called with the number of channels and returns an ``nn.Module``::

    @NORM_REGISTRY.register()
    class MyNorm(nn.GroupNorm):
        def __init__(self, channels):
            super().__init__(16, channels)

A registered name takes precedence over a stock Detectron2 name of the same spelling.
"""

# Names understood by detectron2.layers.batch_norm.get_norm (0.6/0.7), for error messages only.
_D2_NORM_NAMES = (
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
    "LN",
)


def known_norm_names():
    """Sorted names accepted by :func:`get_norm`: Detectron2's stock ones and registered ones."""
    return sorted(set(_D2_NORM_NAMES) | {name for name, _ in NORM_REGISTRY})


def _d2_get_norm():
    """Detectron2's own ``get_norm``, whether or not ours is installed."""
    from detectron2.layers import batch_norm

    return getattr(batch_norm.get_norm, "_megdet_original", batch_norm.get_norm)


def get_norm(norm, out_channels):
    """Drop-in for ``detectron2.layers.get_norm`` that also resolves :data:`NORM_REGISTRY` names.

    Args:
        norm (str or callable or None): a registered name, a stock Detectron2 name ("BN",
            "SyncBN", "FrozenBN", "GN", ...), "" / None (no norm), or a callable taking the
            channel count.
        out_channels (int): number of channels.

    Returns:
        nn.Module or None: the normalization layer.
    """
    if isinstance(norm, str) and norm in NORM_REGISTRY:
        return NORM_REGISTRY.get(norm)(out_channels)
    try:
        return _d2_get_norm()(norm, out_channels)
    except KeyError as e:
        if not isinstance(norm, str) or e.args != (norm,):
            raise
        known = ", ".join(known_norm_names())
        raise ValueError(f"Unknown norm {norm!r} in get_norm; known: {known}") from None


get_norm._megdet_original = None  # set by install_norm_registry


def install_norm_registry():
    """Make Detectron2's norm-name lookup use :func:`get_norm`. Idempotent.

    Replaces ``detectron2.layers.batch_norm.get_norm`` and every module global that still is
    Detectron2's original function (``from detectron2.layers import get_norm`` binds it by value
    in e.g. ``modeling/backbone/fpn.py``, ``modeling/roi_heads/box_head.py``,
    ``projects/deeplab/resnet.py``). Modules imported later bind the replaced function, so they
    need no extra step. Nothing else (configs, registries) is touched.
    """
    from detectron2.layers import batch_norm

    original = _d2_get_norm()
    get_norm._megdet_original = original
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        # Look in the module dict (no __getattr__ side effects); match by identity only. The
        # second test also refreshes functions left by an earlier copy of this module.
        current = namespace.get("get_norm")
        if current is original or getattr(current, "_megdet_original", None) is original:
            module.get_norm = get_norm
    assert batch_norm.get_norm is get_norm
