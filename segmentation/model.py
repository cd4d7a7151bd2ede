"""The NAS-FPN segmenter (docs/recipe.md, Architectures): pyramid fused at P3, a 3-conv head.

EfficientNet C3-C5 -> neck (NAS-FPN by default; any neck of `nets.necks`) ->
P3..P7, each level resampled bilinearly to P3's size and summed -> three
conv3x3-norm-ReLU layers -> dropout -> 1x1 classifier -> logits upsampled bilinearly to
the input size. Cross-entropy over the pixels that are not ignored (255), divided by
the labeled pixels of each group of images (the human part, the pseudo part).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data.augment import IGNORE
from nets.backbone import Backbone
from nets.losses import check_groups, group_scale
from nets.necks import norm2d


class SegmentationHead(nn.Module):
    """`num_convs` x (conv3x3 -> norm -> ReLU), dropout, 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int, num_convs: int = 3, norm: str = "group", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"), norm2d(norm, channels)]
            layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class Segmenter(nn.Module):
    """forward(images [B,3,H,W] uint8 or float 0..255; H, W multiples of 128) -> logits [B,K,H,W]."""

    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module,
        num_classes: int,
        head_norm: str = "group",
        dropout: float = 0.0,
        head_convs: int = 3,
    ):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.num_classes = num_classes
        self.size_divisibility = neck.size_divisibility
        self.head = SegmentationHead(neck.out_channels, num_classes, head_convs, head_norm, dropout)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255, persistent=False)

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of all pyramid levels at the finest level's resolution."""
        levels = sorted(features, key=lambda k: int(k[1:]))
        fine = features[levels[0]]
        out = fine
        for lvl in levels[1:]:
            out = out + F.interpolate(features[lvl], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % self.size_divisibility or w % self.size_divisibility:
            raise ValueError(f"input {h}x{w} is not a multiple of {self.size_divisibility}; pad it (data.augment)")
        x = (images.float() - self.mean) / self.std
        logits = self.head(self.fuse(self.neck(self.backbone(x))))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    @staticmethod
    def loss(logits: torch.Tensor, masks: torch.Tensor, group_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Per-image shares [B] of the group losses: cross-entropy over a group's labeled pixels.

        As detection divides by a group's matched anchors, the cross-entropy is summed
        over every labeled pixel (not 255) of a group of images and divided by the
        group's labeled pixels (at least 1), so a crop with a few confident pixels weighs
        by its pixels, not as much as a full label map. group_sizes: consecutive groups
        of images, normalised separately (a student batch: (num_human, num_pseudo));
        default one group, the whole batch. Image i of a group of n images gets
        n * (its summed cross-entropy) / (the group's labeled pixels), so the mean over a
        group's entries is that group's loss; a group without labeled pixels gives 0.
        Under torch.distributed the labeled pixels are counted over every rank's share
        of the group, and each share is scaled by the number of ranks (DDP averages
        gradients); every rank must call it with the same number of groups.
        """
        group_sizes = check_groups(group_sizes, logits.shape[0])
        masks = masks.to(logits.device).long()
        ce = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="none")
        valid = (masks != IGNORE).flatten(1).sum(1).float()
        return ce.flatten(1).sum(1) * group_scale(valid, group_sizes)
