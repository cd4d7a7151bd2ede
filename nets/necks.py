"""Feature pyramid necks: C3-C5 in, P3-P7 out.

- `FPN`: the RetinaNet pyramid (Lin et al. 2017, "Focal Loss for Dense Object Detection"),
  torchvision's `FeaturePyramidNetwork` with its P6/P7 block.
- `NASFPN`: the searched pyramid (Ghiasi et al. 2019, "NAS-FPN"), one stage of seven
  merging cells repeated `num_repeats` times.
- `SimplePyramid`: the simple feature pyramid of a plain ViT (Li et al. 2022, "Exploring
  Plain Vision Transformer Backbones for Object Detection"), built from its one
  stride-16 map.

FPN and NAS-FPN take {"p3", "p4", "p5"} feature maps at strides 8/16/32, the simple
pyramid {"p4"}; all return {"p3".."p7"} at strides 8..128, every map with
`out_channels` channels. Inputs must be padded to a
multiple of `size_divisibility` (128, the stride of P7) so that every level is exactly
half the previous one; anything else raises ValueError before any compute.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

IN_LEVELS = ("p3", "p4", "p5")
OUT_LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = {lvl: 2 ** int(lvl[1:]) for lvl in OUT_LEVELS}
SIZE_DIVISIBILITY = STRIDES["p7"]


def _level(name: str) -> int:
    return int(name[1])


def check_in_channels(in_channels: dict[str, int], needed: tuple[str, ...] = IN_LEVELS) -> None:
    missing = [lvl for lvl in needed if lvl not in in_channels]
    if missing:
        hint = "; a plain ViT gives p4 alone: use neck 'simple'" if list(in_channels) == ["p4"] else ""
        raise ValueError(f"neck needs input channels for {needed}, missing {missing} in {in_channels}{hint}")


def check_features(features: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless p3..p5 exist and each is exactly half the previous level.

    P3 must itself be a multiple of 16 so that P4..P7 halve exactly too; this holds when
    the input image is a multiple of 128.
    """
    missing = [lvl for lvl in IN_LEVELS if lvl not in features]
    if missing:
        raise ValueError(f"neck needs features {IN_LEVELS}, missing {missing}")
    h3, w3 = features["p3"].shape[-2:]
    divisor = SIZE_DIVISIBILITY // STRIDES["p3"]
    ok = h3 % divisor == 0 and w3 % divisor == 0
    for lvl in IN_LEVELS[1:]:
        f = 2 ** (_level(lvl) - 3)
        ok = ok and tuple(features[lvl].shape[-2:]) == (h3 // f, w3 // f)
    if not ok:
        sizes = {lvl: tuple(features[lvl].shape[-2:]) for lvl in IN_LEVELS}
        raise ValueError(
            f"feature sizes {sizes} do not halve exactly from level to level up to p7 (input about "
            f"{h3 * 8}x{w3 * 8}); pad the input to a multiple of {SIZE_DIVISIBILITY} (neck.size_divisibility)"
        )


def resample(x: torch.Tensor, from_level: int, to_level: int) -> torch.Tensor:
    """Move a map between pyramid levels: max-pool down, nearest-neighbour up.

    Down by factor f = 2**(to - from) is a non-overlapping f x f max-pool (the TF code
    uses an (f+1) window with SAME padding; non-overlapping keeps sizes exact without
    padding arithmetic). Up by f repeats each pixel f x f times.
    """
    if to_level > from_level:
        f = 2 ** (to_level - from_level)
        return F.max_pool2d(x, kernel_size=f, stride=f)
    if to_level < from_level:
        return F.interpolate(x, scale_factor=2 ** (from_level - to_level), mode="nearest")
    return x


def global_attention(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """`hi + lo * sigmoid(max_{H,W} hi)` per channel; both [B, C, H, W] at the same level.

    This is the form of the NAS-FPN authors' TensorFlow code, chosen on purpose: `hi` is
    the input from the coarser original level, its global MAX pool gates `lo`.
    (mmdetection's GlobalPoolingCell uses a global average of the other input and gates
    the opposite way; we do not follow it.)
    """
    return hi + lo * torch.sigmoid(torch.amax(hi, dim=(2, 3), keepdim=True))


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups for `channels`: 32 as in the GroupNorm paper, else the largest
    divisor of `channels` below it (40 -> 20, 48 -> 24), with at least two channels per
    group (32 -> 16): a group of one channel on a 1x1 map (P7 at 128 px) of a single
    image has one value, which GroupNorm cannot normalize."""
    return next(g for g in range(min(max_groups, max(1, channels // 2)), 0, -1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


def norm2d(kind: str, channels: int) -> nn.Module:
    match kind:
        case "none":
            return nn.Identity()
        case "batch":
            return nn.BatchNorm2d(channels)
        case "group":
            return group_norm(channels)
    raise ValueError(f"unknown norm {kind!r}; valid: none, batch, group")


class FPN(nn.Module):
    """RetinaNet FPN: C3-C5 -> P3-P7, strides 8..128, `out_channels` each.

    torchvision's `FeaturePyramidNetwork` with its `LastLevelP6P7` block: 1x1 lateral
    convs, top-down nearest upsampling and sum, 3x3 output convs (each followed by
    `norm`, the conv's bias dropped under one); P6 = 3x3 stride-2 conv on C5, as in the
    RetinaNet paper (torchvision takes P5 instead only when C5 already has
    `out_channels` channels), P7 = ReLU then a 3x3 stride-2 conv on P6. This class adds
    the project's checks of input levels and sizes and the dict interface of both necks.
    """

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(self, in_channels: dict[str, int], out_channels: int, norm: str = "none"):
        super().__init__()
        check_in_channels(in_channels)
        self.out_channels = out_channels
        self.strides = dict(STRIDES)
        self.fpn = FeaturePyramidNetwork(
            [in_channels[lvl] for lvl in IN_LEVELS],
            out_channels,
            extra_blocks=LastLevelP6P7(in_channels["p5"], out_channels),
            norm_layer=None if norm == "none" else functools.partial(norm2d, norm),
        )

    @property
    def lateral(self) -> dict[str, nn.Module]:
        """The 1x1 lateral conv block of each input level."""
        return dict(zip(IN_LEVELS, self.fpn.inner_blocks))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_features(features)
        out = self.fpn(OrderedDict((lvl, features[lvl]) for lvl in IN_LEVELS))
        return {lvl: out[lvl] for lvl in OUT_LEVELS}


class CellSpec(NamedTuple):
    """One NAS-FPN merging cell: `out = conv(op(inputs resampled to level) + residual)`."""

    name: str
    level: int
    inputs: tuple[str, str]
    op: str  # "sum" or "gp" (global_attention)
    residual: str | None  # a stage input at the same level, added before the conv


# The searched stage (Ghiasi et al. 2019, Fig. 7; TF block specs). Names p3..p7 are the
# stage inputs; each cell may read any earlier name. The residuals are the TF rule "add
# same-level nodes nobody consumed yet" worked out for this wiring.
NASFPN_CELLS: tuple[CellSpec, ...] = (
    CellSpec("p4_1", 4, ("p4", "p6"), "gp", None),
    CellSpec("p4_2", 4, ("p4_1", "p4"), "sum", None),
    CellSpec("p3_out", 3, ("p4_2", "p3"), "sum", None),
    CellSpec("p4_out", 4, ("p3_out", "p4_2"), "sum", None),
    CellSpec("p5_out", 5, ("p4_out", "p3_out"), "gp", "p5"),
    CellSpec("p7_out", 7, ("p5_out", "p4_2"), "gp", "p7"),
    CellSpec("p6_out", 6, ("p7_out", "p5_out"), "gp", None),
)
NASFPN_OUTPUTS = {"p3": "p3_out", "p4": "p4_out", "p5": "p5_out", "p6": "p6_out", "p7": "p7_out"}


def _conv3x3(channels: int, separable: bool) -> nn.Module:
    if separable:
        # depthwise then pointwise; the BN that follows makes biases redundant
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
    return nn.Conv2d(channels, channels, 3, padding=1, bias=False)


class MergingCell(nn.Module):
    """Merge two maps already at the same level, then ReLU -> 3x3 conv -> BatchNorm.

    forward(a, b [B, C, H, W], residual [B, C, H, W] or None) -> [B, C, H, W].
    For op "gp", `a` must be the input from the coarser original level (`hi`).
    """

    def __init__(self, channels: int, op: str, separable: bool = False):
        super().__init__()
        if op not in ("sum", "gp"):
            raise ValueError(f"unknown merge op {op!r}; valid: sum, gp")
        self.op = op
        self.conv = _conv3x3(channels, separable)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = a + b if self.op == "sum" else global_attention(a, b)
        if residual is not None:
            x = x + residual
        return self.bn(self.conv(F.relu(x)))


class NASFPNStage(nn.Module):
    """One pass of the cells in `specs` over {"p3".."p7"} maps of equal width.

    forward({"p3".."p7"} [B, C, H/2**k, W/2**k]) -> same levels and shapes.
    """

    def __init__(self, channels: int, specs: tuple[CellSpec, ...] = NASFPN_CELLS, separable: bool = False):
        super().__init__()
        self.specs = specs
        self.cells = nn.ModuleDict({s.name: MergingCell(channels, s.op, separable) for s in specs})

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nodes = dict(features)
        levels = {name: _level(name) for name in features}
        for s in self.specs:
            a, b = s.inputs
            if s.op == "gp" and levels[b] > levels[a]:
                a, b = b, a  # gate with the coarser source (ties keep the listed order, as TF)
            xa = resample(nodes[a], levels[a], s.level)
            xb = resample(nodes[b], levels[b], s.level)
            residual = nodes[s.residual] if s.residual is not None else None
            nodes[s.name] = self.cells[s.name](xa, xb, residual)
            levels[s.name] = s.level
        return {lvl: nodes[NASFPN_OUTPUTS[lvl]] for lvl in OUT_LEVELS}


class NASFPN(nn.Module):
    """NAS-FPN: C3-C5 -> P3-P7, strides 8..128, `out_channels` each.

    P3-P5 enter through 1x1 conv + BatchNorm; P6 = 2x2 stride-2 max-pool of P5 and P7 the
    same of P6. Then `num_repeats` stages (own weights each) of the seven cells in
    `NASFPN_CELLS`; GP cells use the TF-code `global_attention`.
    """

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(self, in_channels: dict[str, int], out_channels: int, num_repeats: int = 3, separable: bool = False):
        super().__init__()
        check_in_channels(in_channels)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.out_channels = out_channels
        self.strides = dict(STRIDES)
        self.inputs = nn.ModuleDict(
            {
                lvl: nn.Sequential(
                    nn.Conv2d(in_channels[lvl], out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
                )
                for lvl in IN_LEVELS
            }
        )
        self.stages = nn.ModuleList(NASFPNStage(out_channels, NASFPN_CELLS, separable) for _ in range(num_repeats))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_features(features)
        x = {lvl: self.inputs[lvl](features[lvl]) for lvl in IN_LEVELS}
        x["p6"] = resample(x["p5"], 5, 6)
        x["p7"] = resample(x["p6"], 6, 7)
        for stage in self.stages:
            x = stage(x)
        return x


class SimplePyramid(nn.Module):
    """A plain ViT's stride-16 map -> P3-P7, strides 8..128, `out_channels` each.

    P3 = a 2x2 stride-2 transposed conv to half the width, P4 = the map itself, P5 = a
    2x2 max-pool; each then 1x1 conv -> LayerNorm -> 3x3 conv -> LayerNorm (as in ViTDet,
    which found this as good as a top-down FPN on a plain ViT); P6 and P7 are 2x2
    max-pools of P5 and P6. Takes {"p4": [B, C, H/16, W/16]}; other levels are ignored.
    """

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(self, in_channels: dict[str, int], out_channels: int):
        super().__init__()
        check_in_channels(in_channels, ("p4",))
        width = in_channels["p4"]
        self.out_channels = out_channels
        self.strides = dict(STRIDES)
        self.rescale = nn.ModuleDict(
            {
                "p3": nn.ConvTranspose2d(width, width // 2, 2, stride=2),
                "p4": nn.Identity(),
                "p5": nn.MaxPool2d(2),
            }
        )
        self.outputs = nn.ModuleDict(
            {
                lvl: nn.Sequential(
                    nn.Conv2d(width // 2 if lvl == "p3" else width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
                for lvl in IN_LEVELS
            }
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features["p4"]
        h, w = x.shape[-2:]
        divisor = SIZE_DIVISIBILITY // STRIDES["p4"]
        if h % divisor or w % divisor:
            raise ValueError(
                f"the stride-16 map is {h}x{w} (input about {h * 16}x{w * 16}), which does not halve "
                f"exactly up to p7; pad the input to a multiple of {SIZE_DIVISIBILITY} (neck.size_divisibility)"
            )
        out = {lvl: self.outputs[lvl](self.rescale[lvl](x)) for lvl in IN_LEVELS}
        out["p6"] = resample(out["p5"], 5, 6)
        out["p7"] = resample(out["p6"], 6, 7)
        return out


NECKS = ("fpn", "nasfpn", "simple")


def build_neck(
    kind: str,
    in_channels: dict[str, int],
    out_channels: int,
    num_repeats: int = 3,
    separable: bool = False,
    norm: str = "none",
) -> nn.Module:
    """ "fpn" (uses `norm`), "nasfpn" (uses `num_repeats`, `separable`; always BatchNorm)
    or "simple" (a plain ViT's pyramid; always LayerNorm)."""
    match kind:
        case "fpn":
            return FPN(in_channels, out_channels, norm=norm)
        case "nasfpn":
            return NASFPN(in_channels, out_channels, num_repeats=num_repeats, separable=separable)
        case "simple":
            return SimplePyramid(in_channels, out_channels)
    raise ValueError(f"unknown neck {kind!r}; valid: {list(NECKS)}")
