"""Backbone and necks: declared channels/strides against real outputs, NAS-FPN wiring,
GP attention and resampling by hand, input validation, checkpoint round trips."""

import pytest
import torch
import torch.nn.functional as F

from nets.backbone import IMAGENET_MEAN, build_backbone, load_checkpoint
from nets.necks import (
    FPN,
    NASFPN,
    NASFPNStage,
    build_neck,
    global_attention,
    resample,
)

B0_WIDTHS = {"p3": 40, "p4": 112, "p5": 320}
B7_WIDTHS = {"p3": 80, "p4": 224, "p5": 640}
LEVELS = ("p3", "p4", "p5", "p6", "p7")


def fake_features(widths: dict[str, int], size: int = 128, batch: int = 1) -> dict[str, torch.Tensor]:
    """Random C3-C5 maps for an input of `size` x `size`."""
    g = torch.Generator().manual_seed(0)
    return {
        lvl: torch.randn(batch, c, size // 2 ** int(lvl[1]), size // 2 ** int(lvl[1]), generator=g)
        for lvl, c in widths.items()
    }


def cell_params(neck: NASFPN) -> int:
    return sum(p.numel() for p in neck.stages.parameters())


# ---------------------------------------------------------------- backbone


PYRAMID_BACKBONES = ["test_efficientnet", "tf_efficientnet_b0", "test_resnetv2_bit", "resnetv2_50x1_bit"]
PLAIN_VITS = ["test_vit", "vit_tiny_patch16_224"]


@pytest.mark.parametrize("name", PYRAMID_BACKBONES + PLAIN_VITS)
def test_backbone_declares_actual_shapes(name):
    backbone = build_backbone(name).eval()
    x = torch.randn(1, 3, 128, 256)  # not the 224 px a ViT was made for: its positions are interpolated
    with torch.no_grad():
        out = backbone(x)
    levels = ["p4"] if name in PLAIN_VITS else ["p3", "p4", "p5"]
    assert list(out) == levels == list(backbone.channels)
    assert backbone.strides == {lvl: 2 ** int(lvl[1]) for lvl in levels}
    for lvl, f in out.items():
        s = backbone.strides[lvl]
        assert tuple(f.shape) == (1, backbone.channels[lvl], 128 // s, 256 // s)
    if name == "tf_efficientnet_b0":
        assert backbone.channels == B0_WIDTHS
    if name == "resnetv2_50x1_bit":
        assert backbone.channels == {"p3": 512, "p4": 1024, "p5": 2048}


def test_backbones_take_their_input_statistics_from_timm():
    assert build_backbone("test_efficientnet").mean == IMAGENET_MEAN
    bit, vit = build_backbone("test_resnetv2_bit"), build_backbone("test_vit")
    assert bit.mean == bit.std == vit.mean == vit.std == (0.5, 0.5, 0.5)


def test_bit_backbone_is_group_norm_and_weight_standardized():
    from timm.layers import GroupNormAct, StdConv2d

    body = build_backbone("test_resnetv2_bit").body
    kinds = {type(m) for m in body.modules()}
    assert GroupNormAct in kinds and StdConv2d in kinds
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in body.modules())
    # its output does not depend on the rest of the batch: no batch statistics, in training too
    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        alone = body.train()(x[:1])[-1]
        together = body(x)[-1][:1]
    assert torch.allclose(alone, together, rtol=1e-4, atol=1e-4)


def test_drop_path_reaches_the_vit_blocks():
    from timm.layers import DropPath

    rates = [m.drop_prob for m in build_backbone("test_vit", drop_path_rate=0.2).modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)


def test_unknown_backbone_name_raises_with_name():
    with pytest.raises(ValueError, match="tf_efficientnet_b99") as info:
        build_backbone("tf_efficientnet_b99")
    assert "tf_efficientnet_b" in str(info.value).replace("tf_efficientnet_b99", "")


def test_checkpoint_roundtrip_own_state_dict(tmp_path):
    src = build_backbone("test_efficientnet").eval()
    path = tmp_path / "backbone.pt"
    torch.save(src.state_dict(), path)
    dst = build_backbone("test_efficientnet", checkpoint=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for lvl in a:
        assert torch.equal(a[lvl], b[lvl])


def test_checkpoint_from_full_timm_classifier_drops_head(tmp_path):
    import timm

    full = timm.create_model("test_efficientnet", pretrained=False).eval()
    path = tmp_path / "timm.pt"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("test_efficientnet").eval()
    report = load_checkpoint(backbone, str(path))
    assert not report.missing and not report.unexpected
    assert any(k.startswith("classifier.") for k in report.dropped_head)
    assert torch.equal(backbone.body.conv_stem.weight, full.conv_stem.weight)
    # the features model is the classifier's trunk: its last map equals the trunk's blocks output
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = full.blocks(full.bn1(full.conv_stem(x)))
        assert torch.allclose(backbone(x)["p5"], trunk, atol=1e-6)


def test_checkpoint_nothing_matches_raises(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no key matches"):
        build_backbone("test_efficientnet", checkpoint=str(path))


def test_checkpoint_partial_warns_with_missing_keys(tmp_path):
    state = build_backbone("test_efficientnet").state_dict()
    dropped = "body.conv_stem.weight"
    del state[dropped]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="conv_stem.weight"):
        report = load_checkpoint(build_backbone("test_efficientnet"), str(path))
    assert report.missing == ["conv_stem.weight"]


# ---------------------------------------------------------------- necks: shapes


@pytest.mark.parametrize("widths", [B0_WIDTHS, B7_WIDTHS], ids=["b0", "b7"])
@pytest.mark.parametrize("kind", ["fpn", "nasfpn"])
def test_neck_output_shapes_and_strides(kind, widths):
    neck = build_neck(kind, widths, 32, num_repeats=2).eval()
    assert neck.strides == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert neck.size_divisibility == 128
    size = 256
    with torch.no_grad():
        out = neck(fake_features(widths, size=size, batch=2))
    assert list(out) == list(LEVELS)
    for lvl, f in out.items():
        s = neck.strides[lvl]
        assert tuple(f.shape) == (2, neck.out_channels, size // s, size // s)


@pytest.mark.parametrize("kind", ["fpn", "nasfpn"])
def test_neck_on_real_backbone(kind):
    backbone = build_backbone("test_efficientnet")
    neck = build_neck(kind, backbone.channels, 16, num_repeats=1).eval()
    with torch.no_grad():
        out = neck(backbone.eval()(torch.randn(1, 3, 128, 128)))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("kind", ["fpn", "nasfpn"])
def test_size_not_multiple_of_128_raises(kind):
    neck = build_neck(kind, B0_WIDTHS, 16)
    # 192 = 1.5 x 128: p3..p5 halve exactly (24, 12, 6) but p6 -> p7 would not
    with pytest.raises(ValueError, match="multiple of 128"):
        neck(fake_features(B0_WIDTHS, size=192))
    # what a "same"-padded backbone gives for a 120-pixel input: 15, 8, 4
    feats = {lvl: torch.randn(1, c, s, s) for (lvl, c), s in zip(B0_WIDTHS.items(), (15, 8, 4))}
    with pytest.raises(ValueError, match="multiple of 128"):
        neck(feats)


@pytest.mark.parametrize("name", PLAIN_VITS)
def test_simple_pyramid_on_a_plain_vit(name):
    backbone = build_backbone(name).eval()
    neck = build_neck("simple", backbone.channels, 16).eval()
    assert neck.strides == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128} and neck.size_divisibility == 128
    with torch.no_grad():
        out = neck(backbone(torch.randn(2, 3, 256, 128)))
    assert list(out) == list(LEVELS)
    assert [tuple(f.shape) for f in out.values()] == [(2, 16, 256 // s, 128 // s) for s in (8, 16, 32, 64, 128)]


def test_simple_pyramid_refuses_sizes_that_do_not_reach_p7():
    neck = build_neck("simple", {"p4": 32}, 16)
    with pytest.raises(ValueError, match="multiple of 128"):
        neck({"p4": torch.randn(1, 32, 12, 8)})  # a 192 x 128 input


def test_a_plain_vit_under_an_fpn_is_told_to_use_the_simple_pyramid():
    with pytest.raises(ValueError, match="use neck 'simple'"):
        build_neck("fpn", build_backbone("test_vit").channels, 16)


def test_vit_checkpoint_of_another_grid_loads_with_its_positions_resampled(tmp_path):
    import timm

    # a classifier trained at 96 px (a 6 x 6 grid) loaded into the model of timm's 160 px (10 x 10)
    full = timm.create_model("test_vit", pretrained=False, img_size=96)
    path = tmp_path / "vit96.pt"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("test_vit")
    report = load_checkpoint(backbone, str(path))
    assert not report.missing and not report.unexpected and report.dropped_head
    own = backbone.body.state_dict()
    assert full.pos_embed.shape == (1, 1 + 6 * 6, 64) and own["model.pos_embed"].shape == (1, 1 + 10 * 10, 64)
    assert torch.equal(own["model.pos_embed"][:, :1], full.pos_embed[:, :1])  # the class token's, kept
    assert torch.equal(own["model.blocks.0.attn.qkv.weight"], full.blocks[0].attn.qkv.weight)


def test_bit_checkpoint_of_the_full_classifier_loads(tmp_path):
    import timm

    full = timm.create_model("test_resnetv2_bit", pretrained=False)
    path = tmp_path / "bit.pt"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("test_resnetv2_bit")
    report = load_checkpoint(backbone, str(path))
    assert not report.missing and not report.unexpected
    assert {k.split(".")[0] for k in report.dropped_head} == {"norm", "head"}
    assert torch.equal(backbone.body.state_dict()["stem_conv.weight"], full.stem.conv.weight)


def test_unknown_neck_kind_lists_valid():
    with pytest.raises(ValueError, match="nasfpn"):
        build_neck("bifpn", B0_WIDTHS, 16)


def test_missing_input_level_raises():
    with pytest.raises(ValueError, match="p5"):
        FPN({"p3": 8, "p4": 8}, 16)


# ---------------------------------------------------------------- NAS-FPN details


def test_nasfpn_repeats_scale_cell_parameters():
    one = NASFPN(B0_WIDTHS, 16, num_repeats=1)
    three = NASFPN(B0_WIDTHS, 16, num_repeats=3)
    assert cell_params(three) == 3 * cell_params(one) > 0
    # each repeat has its own weights, not shared modules
    assert three.stages[0].cells["p4_1"].conv.weight is not three.stages[1].cells["p4_1"].conv.weight
    assert len(one.stages[0].cells) == 7


def test_nasfpn_separable_builds_runs_and_is_smaller():
    dense = NASFPN(B0_WIDTHS, 32, num_repeats=1)
    sep = NASFPN(B0_WIDTHS, 32, num_repeats=1, separable=True).eval()
    assert cell_params(sep) < cell_params(dense)
    assert any(m.groups == 32 for m in sep.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        out = sep(fake_features(B0_WIDTHS))
    assert tuple(out["p7"].shape) == (1, 32, 1, 1)
    assert all(torch.isfinite(f).all() for f in out.values())


def test_global_attention_by_hand():
    hi = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[-1.0, -4.0], [-2.0, -3.0]]]])  # [1, 2, 2, 2]
    lo = torch.tensor([[[[2.0, 2.0], [2.0, 2.0]], [[1.0, 0.0], [-1.0, 2.0]]]])
    gate = torch.sigmoid(torch.tensor([3.0, -1.0]))  # per-channel max of hi
    expected = hi.clone()
    expected[0, 0] += lo[0, 0] * gate[0]
    expected[0, 1] += lo[0, 1] * gate[1]
    assert torch.allclose(global_attention(hi, lo), expected)
    # gating is not symmetric: swapping roles changes the result
    assert not torch.allclose(global_attention(lo, hi), expected)


def test_gp_cell_gates_with_coarser_source():
    """P4_1 = GP(P4, P6): P6 (the coarser source, upsampled) must be `hi`; P7_out gets + P7."""
    stage = NASFPNStage(2).eval()
    seen = {}
    for name in ("p4_1", "p7_out"):
        stage.cells[name].register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args}))
    x = {lvl: torch.randn(1, 2, 2 ** (7 - int(lvl[1])), 2 ** (7 - int(lvl[1]))) for lvl in LEVELS}
    with torch.no_grad():
        stage(x)
    hi, lo, residual = seen["p4_1"]
    assert torch.equal(hi, resample(x["p6"], 6, 4))
    assert torch.equal(lo, x["p4"])
    assert residual is None
    assert torch.equal(seen["p7_out"][2], x["p7"])


def test_resample_matches_pool_and_nearest():
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(resample(x, 3, 3), x)
    assert torch.equal(resample(x, 3, 4), F.max_pool2d(x, 2, 2))
    assert torch.equal(resample(x, 3, 5), F.max_pool2d(x, 4, 4))
    up = resample(x, 5, 3)
    assert up.shape == (1, 3, 32, 32)
    assert torch.equal(up, x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))
    # a hand case: max of each 2x2 block
    t = torch.arange(16.0).view(1, 1, 4, 4)
    assert resample(t, 3, 4).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]


@pytest.mark.parametrize("kind", ["fpn", "nasfpn"])
def test_gradients_reach_lateral_convs(kind):
    neck = build_neck(kind, B0_WIDTHS, 16, num_repeats=1, norm="group")
    out = neck(fake_features(B0_WIDTHS, batch=2))
    sum(f.square().mean() for f in out.values()).backward()
    laterals = neck.lateral if kind == "fpn" else neck.inputs
    for lvl in ("p3", "p4", "p5"):
        g = laterals[lvl][0].weight.grad
        assert g is not None and g.abs().sum() > 0, lvl


def test_fpn_norm_options():
    for norm, cls in [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm)]:
        neck = FPN(B0_WIDTHS, 48, norm=norm)
        assert any(isinstance(m, cls) for m in neck.modules())
    with pytest.raises(ValueError, match="norm"):
        FPN(B0_WIDTHS, 16, norm="layer")
