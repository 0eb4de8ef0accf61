"""Norm names from NORM_REGISTRY work wherever Detectron2 accepts a norm name."""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.config import LazyCall, get_cfg, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from torch import nn

import megdet_d2.layers  # noqa: F401  (registration: installs the norm registry)
from megdet_d2.layers import CGBN, NORM_REGISTRY, get_norm, install_norm_registry, known_norm_names
from megdet_d2.layers.norm_registry import UnknownNormError

# Every detectron2 module that binds `get_norm` at import time.
_D2_GET_NORM_USERS = [
    "detectron2.layers",
    "detectron2.layers.batch_norm",
    "detectron2.layers.aspp",
    "detectron2.layers.blocks",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.backbone.regnet",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.vit",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
    "detectron2.modeling.meta_arch.semantic_seg",
]


@NORM_REGISTRY.register()
class _TestGN4(nn.GroupNorm):
    """A user norm registered by name: GroupNorm with 4 groups."""

    def __init__(self, channels):
        super().__init__(4, channels)


@pytest.mark.parametrize("module_name", _D2_GET_NORM_USERS)
def test_installed_in_detectron2_modules(module_name):
    assert importlib.import_module(module_name).get_norm is get_norm


def test_install_is_idempotent():
    install_norm_registry()
    install_norm_registry()
    from detectron2.layers import batch_norm

    assert batch_norm.get_norm is get_norm
    original = get_norm._megdet_original
    assert original is not get_norm and original.__module__ == "detectron2.layers.batch_norm"
    assert isinstance(original("BN", 4), nn.BatchNorm2d)


def test_registered_names():
    from detectron2.layers import get_norm as d2_get_norm

    norm = d2_get_norm("CGBN", 8)
    assert type(norm) is CGBN and norm.num_features == 8
    assert type(d2_get_norm("_TestGN4", 8)) is _TestGN4


def test_stock_values_pass_through():
    from detectron2.layers import get_norm as d2_get_norm

    assert type(d2_get_norm("BN", 8)) is nn.BatchNorm2d
    assert type(d2_get_norm("FrozenBN", 8)) is FrozenBatchNorm2d
    assert type(d2_get_norm("SyncBN", 8)) is nn.SyncBatchNorm
    gn = d2_get_norm("GN", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32
    assert d2_get_norm("", 8) is None
    assert d2_get_norm(None, 8) is None
    custom = d2_get_norm(lambda c: nn.GroupNorm(2, c), 8)
    assert type(custom) is nn.GroupNorm and custom.num_groups == 2


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:  # detectron2's exception type
        get_norm("XYZ", 8)
    assert isinstance(info.value, UnknownNormError)
    message = str(info.value)
    assert "\n" not in message and "'XYZ'" in message
    for name in ("BN", "CGBN", "FrozenBN", "GN", "LN", "SyncBN", "_TestGN4"):
        assert name in message.split("known: ")[1].split(", ")
    assert message.split("known: ")[1].split(", ") == known_norm_names()


def test_user_norm_by_name_in_yaml_cfg(tmp_path):
    yaml = tmp_path / "user_norm.yaml"
    yaml.write_text(textwrap.dedent("""
            MODEL:
              BACKBONE:
                NAME: "build_resnet_fpn_backbone"
                FREEZE_AT: 0
              RESNETS:
                DEPTH: 18
                RES2_OUT_CHANNELS: 64
                OUT_FEATURES: ["res2", "res3", "res4", "res5"]
                NORM: "_TestGN4"
              FPN:
                IN_FEATURES: ["res2", "res3", "res4", "res5"]
                OUT_CHANNELS: 32
                NORM: "CGBN"
            """))
    cfg = get_cfg()
    cfg.merge_from_file(str(yaml))
    backbone = build_backbone(cfg)
    assert type(backbone.bottom_up.stem.conv1.norm) is _TestGN4
    assert type(backbone.bottom_up.res5[0].conv2.norm) is _TestGN4
    for conv in backbone.lateral_convs + backbone.output_convs:
        assert type(conv.norm) is CGBN
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]


def test_lazy_call():
    norm = instantiate(LazyCall(CGBN)(num_features=64, eps=1e-3))
    assert type(norm) is CGBN and norm.num_features == 64 and norm.eps == 1e-3
    head_norm = instantiate(LazyCall(get_norm)(norm="CGBN", out_channels=16))
    assert type(head_norm) is CGBN and head_norm.num_features == 16


def test_lazy_example_config():
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load("configs/lazy/cgbn_example.py")
    cfg.model.backbone.bottom_up.stages.depth = 18
    cfg.model.backbone.bottom_up.stages.pop("stride_in_1x1")
    cfg.model.backbone.out_channels = 32
    cfg.model.roi_heads.box_head.input_shape.channels = 32
    cfg.model.roi_heads.mask_head.input_shape.channels = 32
    cfg.model.proposal_generator.head.in_channels = 32
    model = instantiate(cfg.model)
    bottom_up = model.backbone.bottom_up
    # Stem + res2 are frozen (freeze_at=2): detectron2 turns their BN into FrozenBN.
    assert type(bottom_up.stem.conv1.norm) is FrozenBatchNorm2d
    assert all(type(block.conv1.norm) is CGBN for block in bottom_up.res3)
    assert all(type(conv.norm) is CGBN for conv in model.backbone.lateral_convs)
    assert all(type(conv.norm) is CGBN for conv in model.roi_heads.box_head.conv_norm_relus)
    assert all(type(conv.norm) is CGBN for conv in model.roi_heads.mask_head.conv_norm_relus)


def _run_python(code):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_modules_imported_before_and_after_install():
    """Modules bound before the install are patched; modules imported later bind ours."""
    out = _run_python("""
        import detectron2.modeling.backbone.fpn as before
        original = before.get_norm
        import megdet_d2.layers
        import detectron2.projects.deeplab.resnet as after
        ours = megdet_d2.layers.get_norm
        assert before.get_norm is ours and after.get_norm is ours, (before.get_norm, ours)
        assert original is not ours and original is ours._megdet_original
        print(type(after.get_norm("CGBN", 4)).__name__)
        """)
    assert out.split() == ["CGBN"]


# A plugin that wraps get_norm the usual way: save the current function, install a wrapper that
# handles its own name and falls back to the saved one.
_PLUGIN = """
from detectron2.layers import batch_norm
from torch import nn
saved = batch_norm.get_norm
def plugin_get_norm(norm, out_channels):
    if norm == "PluginGN":
        return nn.GroupNorm(2, out_channels)
    return saved(norm, out_channels)
batch_norm.get_norm = plugin_get_norm
"""
_BUILD = """
import detectron2.modeling.backbone.fpn as fpn_module
from detectron2.layers import batch_norm
print(*[type(f(n, 8)).__name__ for f in (batch_norm.get_norm, fpn_module.get_norm)
        for n in ("CGBN", "BN")])
print(type(batch_norm.get_norm("PluginGN", 8)).__name__)
try:
    batch_norm.get_norm("XYZ", 8)
except KeyError as e:
    print(type(e).__name__)
"""


@pytest.mark.parametrize("order", ["plugin_after_megdet", "plugin_before_megdet"])
def test_another_plugin_wrapping_get_norm(order):
    """No RecursionError when a plugin wraps ours; no KeyError for "CGBN" in modules that held
    detectron2's original when the plugin was installed first."""
    import_megdet = "import megdet_d2\n"
    first, second = (
        (import_megdet, _PLUGIN)
        if order == "plugin_after_megdet"
        else ("import detectron2.modeling.backbone.fpn\n" + _PLUGIN, import_megdet)
    )
    out = _run_python(first + second + _BUILD)
    assert out.split() == ["CGBN", "BatchNorm2d", "CGBN", "BatchNorm2d", "GroupNorm",
                           "UnknownNormError"], out  # fmt: skip


def _retinanet_cfg(norm):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NORM = norm
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_retinanet_head_gets_per_level_cgbn_like_syncbn():
    from detectron2.layers import CycleBatchNormList
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    sync = build_model(_retinanet_cfg("SyncBN")).head
    cgbn = build_model(_retinanet_cfg("CGBN")).head
    levels = 5  # P3..P7
    for head, cls in ((sync, nn.SyncBatchNorm), (cgbn, CGBN)):
        norms = [m for m in head.cls_subnet if isinstance(m, CycleBatchNormList)]
        assert len(norms) == 2 and all(len(n) == levels for n in norms)
        assert all(type(bn) is cls for n in norms for bn in n)
    # same parameters and buffers, same names: checkpoints move between the two
    assert list(sync.state_dict()) == list(cgbn.state_dict())
    cgbn.load_state_dict(sync.state_dict())
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 32, s, s, generator=g) for s in (16, 8, 4, 2, 1)]
    for _ in range(2):  # train mode: per-level running statistics (one process: CGBN = BN)
        sync(features), cgbn(features)
    sync.eval(), cgbn.eval()
    with torch.no_grad():
        for a, b in zip(*(sum(head(features), []) for head in (sync, cgbn))):
            assert torch.allclose(a, b, atol=1e-6)
    shared = build_model(_retinanet_cfg("FrozenBN")).head  # other names: unchanged
    assert not any(isinstance(m, CycleBatchNormList) for m in shared.modules())


def test_retinanet_head_explicit_arguments():
    from detectron2.layers import CycleBatchNormList, ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    head = RetinaNetHead(input_shape=[ShapeSpec(channels=8)] * 3, num_classes=2, num_anchors=1,
                         conv_dims=[8], norm="CGBN")  # fmt: skip
    norm = head.bbox_subnet[1]
    assert isinstance(norm, CycleBatchNormList) and len(norm) == 3 and type(norm[0]) is CGBN
