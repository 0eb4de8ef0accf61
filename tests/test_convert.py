"""convert_to_cgbn: every BN flavour becomes CGBN with state, flags and outputs preserved."""

import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.layers import get_norm as d2_get_norm
from detectron2.modeling import build_resnet_backbone
from torch import nn

from megdet_d2.layers import CGBN, convert_to_cgbn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)


def _randomize_norms(model, seed=0):
    """Non-trivial affine parameters and running statistics, so conversion errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORM_TYPES):
                continue
            c = m.num_features
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def _norms(model):
    return [m for m in model.modules() if isinstance(m, _NORM_TYPES)]


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.frozen = FrozenBatchNorm2d(c, eps=1e-3)
        self.naive = NaiveSyncBatchNorm(c, momentum=0.3)
        self.plain = nn.BatchNorm2d(c, affine=False)

    def forward(self, x):
        return self.plain(self.naive(self.frozen(self.conv(x))))


def _small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=1e-4, momentum=0.05),
        nn.ReLU(),
        nn.Sequential(_Block(8), nn.SyncBatchNorm(8)),
        d2_get_norm("BN", 8),
    )


def test_small_model_outputs_and_state_preserved():
    model = _randomize_norms(_small_model()).double().eval()
    model[1].weight.requires_grad_(False)
    model[1].num_batches_tracked.fill_(7)
    before = [(type(m), m.eps, m.weight, getattr(m, "running_var", None)) for m in _norms(model)]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)

    converted = convert_to_cgbn(model)

    assert converted is model
    norms = _norms(converted)
    assert len(norms) == len(before) == 6
    assert all(type(m) is CGBN for m in norms)
    for m, (old_type, eps, weight, running_var) in zip(norms, before):
        assert m.eps == eps and not m.training
        assert m.running_mean.dtype == torch.float64
        if weight is not None:
            assert m.weight.dtype == torch.float64 and m.weight is not weight
        torch.testing.assert_close(m.running_var, running_var)
    bn, frozen, naive, plain = converted[1], *list(converted[3][0].children())[1:]
    assert bn.momentum == 0.05 and int(bn.num_batches_tracked) == 7
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    assert naive.momentum == 0.3
    assert not plain.affine and plain.track_running_stats
    # FrozenBatchNorm2d buffers become trainable parameters.
    assert isinstance(frozen.weight, nn.Parameter) and frozen.weight.requires_grad
    assert frozen.bias.requires_grad and frozen.affine and frozen.eps == 1e-3
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-12, atol=1e-12)


def test_training_mode_and_flags_kept():
    model = nn.Sequential(
        nn.BatchNorm2d(4, track_running_stats=False), nn.SyncBatchNorm(4, affine=False)
    )
    model[1].eval()
    converted = convert_to_cgbn(model)
    assert [type(m) for m in converted] == [CGBN, CGBN]
    assert converted[0].training and not converted[1].training
    assert not converted[0].track_running_stats and converted[0].running_mean is None
    assert not converted[1].affine and converted[1].weight is None


def test_top_level_norm_replaced_and_cgbn_kept():
    bn = _randomize_norms(nn.BatchNorm2d(4))
    cgbn = convert_to_cgbn(bn)
    assert type(cgbn) is CGBN and cgbn is not bn
    torch.testing.assert_close(cgbn.running_mean, bn.running_mean)
    torch.testing.assert_close(cgbn.weight, bn.weight)
    existing = CGBN(4)
    assert convert_to_cgbn(existing) is existing
    model = nn.Sequential(existing)
    assert convert_to_cgbn(model)[0] is existing


def test_frozen_bn_resnet_same_eval_outputs():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    model = _randomize_norms(model).double().eval()
    assert all(type(m) is FrozenBatchNorm2d for m in _norms(model))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)

    converted = convert_to_cgbn(model)

    norms = _norms(converted)
    assert len(norms) == 1 + 8 * 2 + 3 and all(type(m) is CGBN for m in norms)
    assert all(m.weight.requires_grad for m in norms)
    with torch.no_grad():
        out = converted(x)
    assert sorted(out) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-10, atol=1e-10)
