"""Backbones this project adds to timm's registry: tiny variants for tests and demos.

timm has tiny test models of EfficientNet (`test_efficientnet`) and ViT (`test_vit`) but
none of the Big Transfer ResNet-v2 (GroupNorm + Weight Standardization,
Kolesnikov et al. 2020); `test_resnetv2_bit` is the `resnetv2_50x1_bit` recipe (fixed
stem, weight-standardized convs, pre-activation GroupNorm) at one block per stage and
an eighth of the width. Registered by name, it is configured like any timm model
(`model.backbone: test_resnetv2_bit`). Importing `nets.backbone` registers it.
"""

from __future__ import annotations

import functools

import timm
from timm.layers import GroupNormAct, StdConv2d
from timm.models import build_model_with_cfg, register_model
from timm.models.resnetv2 import ResNetV2

# read by timm's `register_model`: the input statistics BiT models expect
default_cfgs = {
    "test_resnetv2_bit": {
        "num_classes": 1000,
        "input_size": (3, 160, 160),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv",
        "classifier": "head.fc",
    }
}


def test_resnetv2_bit(pretrained: bool = False, **kwargs) -> ResNetV2:
    """BiT ResNet-v2 at 1/8 width, one bottleneck per stage: 0.13 M parameters as a
    feature extractor; 8 groups per GroupNorm (its narrowest bottleneck has 8 channels)."""
    args = dict(
        layers=(1, 1, 1, 1),
        channels=(32, 64, 128, 256),
        stem_chs=16,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        norm_layer=functools.partial(GroupNormAct, num_groups=8),
    )
    return build_model_with_cfg(
        ResNetV2, "test_resnetv2_bit", pretrained, feature_cfg=dict(flatten_sequential=True), **dict(args, **kwargs)
    )


if not timm.is_model("test_resnetv2_bit"):  # a timm release that ships its own wins
    register_model(test_resnetv2_bit)
