"""Registry of normalization layers selectable by name in Detectron2 configs.

Detectron2 resolves norm names (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ...) with
``detectron2.layers.get_norm``, a fixed table without a registry. :func:`install_norm_registry`
makes that lookup consult :data:`NORM_REGISTRY` first, so a registered name (e.g. ``"CGBN"``)
works with the stock ``build_model`` wherever Detectron2 accepts a norm name.
"""

import functools
import logging
import sys

from fvcore.common.registry import Registry
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "NORM_REGISTRY",
    "UnknownNormError",
    "get_norm",
    "install_norm_registry",
    "known_norm_names",
]

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


class UnknownNormError(KeyError):
    """An unknown norm name: a ``KeyError``, as detectron2 raises, with the known names."""

    def __str__(self):
        return self.args[0]


def _is_d2_original(fn):
    """Whether ``fn`` is detectron2's own ``get_norm`` (whoever has wrapped it since)."""
    return (
        getattr(fn, "__module__", None) == "detectron2.layers.batch_norm"
        and getattr(fn, "__qualname__", None) == "get_norm"
    )


def _is_ours(fn):
    """Ours, or a copy of ours from an earlier import of this module."""
    return fn is get_norm or hasattr(fn, "_megdet_original")


def get_norm(norm, out_channels):
    """Drop-in for ``detectron2.layers.get_norm`` that also resolves :data:`NORM_REGISTRY` names.

    Args:
        norm (str or callable or None): a registered name, a stock Detectron2 name ("BN",
            "SyncBN", "FrozenBN", "GN", ...), "" / None (no norm), or a callable taking the
            channel count.
        out_channels (int): number of channels.

    Returns:
        nn.Module or None: the normalization layer.

    Other names go to the ``get_norm`` that was current when :func:`install_norm_registry` ran
    (detectron2's, or another plugin's wrapper of it); an unknown name raises
    :class:`UnknownNormError`, a ``KeyError`` like detectron2's, listing the known names.
    """
    if isinstance(norm, str) and norm in NORM_REGISTRY:
        return NORM_REGISTRY.get(norm)(out_channels)
    fallback = get_norm._megdet_original
    if fallback is None:  # not installed: detectron2's own
        from detectron2.layers import batch_norm

        fallback = batch_norm.get_norm
    try:
        return fallback(norm, out_channels)
    except KeyError as e:
        if not isinstance(norm, str) or e.args != (norm,):
            raise
        known = ", ".join(known_norm_names())
        raise UnknownNormError(f"Unknown norm {norm!r} in get_norm; known: {known}") from None


# The get_norm that was current at install time (detectron2's, or a wrapper of it): where names
# not in NORM_REGISTRY go. Captured once, never looked up at call time, so a plugin that wraps
# ours later (and falls back to it) cannot send a lookup round in circles.
get_norm._megdet_original = None


def install_norm_registry():
    """Make Detectron2's norm-name lookup use :func:`get_norm`. Idempotent.

    Replaces ``detectron2.layers.batch_norm.get_norm`` and every module global holding
    detectron2's original function or the function current before this call (another plugin's
    wrapper): ``from detectron2.layers import get_norm`` binds by value in e.g.
    ``modeling/backbone/fpn.py``, ``modeling/roi_heads/box_head.py``,
    ``projects/deeplab/resnet.py``. Modules imported later bind ours. Also gives RetinaNet's
    head per-level layers for registered BatchNorm classes, as for "BN" / "SyncBN"
    (:func:`_install_retinanet_per_level_norms`). Nothing else is touched.
    """
    from detectron2.layers import batch_norm

    current = batch_norm.get_norm
    if not _is_ours(current):
        get_norm._megdet_original = current
    elif get_norm._megdet_original is None:  # a copy of ours from an earlier import
        get_norm._megdet_original = current._megdet_original
    replaced = {id(current)}
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        # Look in the module dict (no __getattr__ side effects); match by identity only.
        bound = namespace.get("get_norm")
        if bound is None or bound is get_norm:
            continue
        if id(bound) in replaced or _is_d2_original(bound) or _is_ours(bound):
            module.get_norm = get_norm
    assert batch_norm.get_norm is get_norm
    _install_retinanet_per_level_norms()


class _PerLevelNorm:
    """``norm(channels)`` for RetinaNet's head: one ``cls`` per FPN level, cycled (detectron2's
    ``CycleBatchNormList``), as the head builds for "BN" and "SyncBN"."""

    def __init__(self, cls, levels):
        self.cls, self.levels = cls, levels

    def __call__(self, channels):
        from detectron2.layers import CycleBatchNormList

        return CycleBatchNormList(length=self.levels, bn_class=self.cls, num_features=channels)


def _per_level(norm, levels):
    """``norm`` itself, or a per-level norm for a registered BatchNorm class."""
    if isinstance(norm, str) and norm in NORM_REGISTRY:
        cls = NORM_REGISTRY.get(norm)
        if isinstance(cls, type) and issubclass(cls, _BatchNorm):
            logging.getLogger(__name__).info(
                f"Using domain-specific {norm} in RetinaNetHead with len={levels}."
            )
            return _PerLevelNorm(cls, levels)
    return norm


def _install_retinanet_per_level_norms():
    """Detectron2's ``RetinaNetHead`` builds per-level BN only for the strings "BN" / "SyncBN";
    any other BN name would share one layer (and its running statistics) across FPN levels.
    Wrap its ``from_config`` (YAML) and ``__init__`` (explicit arguments) so that a registered
    BatchNorm class, e.g. "CGBN", gets per-level layers too. Idempotent."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    if getattr(RetinaNetHead, "_megdet_per_level", False):
        return
    from_config = RetinaNetHead.from_config.__func__
    init = RetinaNetHead.__init__

    @functools.wraps(from_config)
    def per_level_from_config(cls, cfg, input_shape):
        kwargs = from_config(cls, cfg, input_shape)
        kwargs["norm"] = _per_level(kwargs.get("norm", ""), len(input_shape))
        return kwargs

    @functools.wraps(init)
    def per_level_init(self, *args, **kwargs):
        if "norm" in kwargs and "input_shape" in kwargs:  # explicit arguments, not a cfg
            kwargs["norm"] = _per_level(kwargs["norm"], len(kwargs["input_shape"]))
        init(self, *args, **kwargs)

    RetinaNetHead.from_config = classmethod(per_level_from_config)
    RetinaNetHead.__init__ = per_level_init
    RetinaNetHead._megdet_per_level = True
