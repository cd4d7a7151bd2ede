"""Augmentation levels shared by both families (RECIPE.md, Augmentation levels).

A sample is `(image, target)`: image uint8 [3,H,W] RGB; target a dict holding
`boxes_xyxy` float32 [N,4] in pixels with `labels` int64 [N] (detection), and/or
`mask` uint8 [H,W] with 255 = ignore (segmentation). Every geometric op moves
image, boxes and mask together. Each level returns a `size` x `size` image.

Levels:
- "none": letterbox (resize the long side to `size`, pad bottom/right); evaluation
  and teacher inputs use this.
- "S1": horizontal flip, scale jitter (0.8, 1.2), then random crop/pad to `size`.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

FILL = 128  # image padding value (RECIPE.md: fill value 128)
IGNORE = 255  # mask padding value

LEVELS = ("none", "S1")
SCALE_RANGE = {"S1": (0.8, 1.2)}

# A box cropped to less than this fraction of its area is dropped: too little is left
# of the object to call it one.
MIN_VISIBLE = 0.25
MIN_SIDE = 1.0  # pixels


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def resize(image: torch.Tensor, target: dict, scale: float) -> tuple[torch.Tensor, dict]:
    """Resize by `scale` (aspect kept); boxes scaled, mask resampled nearest."""
    h, w = image.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = TF.resize(image, [nh, nw], antialias=True)
    out = dict(target)
    if "boxes_xyxy" in target:
        sx, sy = nw / w, nh / h
        out["boxes_xyxy"] = target["boxes_xyxy"] * torch.tensor([sx, sy, sx, sy])
    if "mask" in target:
        out["mask"] = TF.resize(
            target["mask"][None], [nh, nw], interpolation=InterpolationMode.NEAREST_EXACT
        )[0]
    return image, out


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    out = dict(target)
    if "boxes_xyxy" in target:
        b = target["boxes_xyxy"]
        out["boxes_xyxy"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "mask" in target:
        out["mask"] = target["mask"].flip(-1)
    return image.flip(-1), out


def crop_pad(
    image: torch.Tensor, target: dict, top: int, left: int, size: int
) -> tuple[torch.Tensor, dict]:
    """Take the `size` x `size` window at (top, left), padding past the image edge.

    Boxes are shifted and clipped; a box left with less than MIN_VISIBLE of its area
    or a side under MIN_SIDE pixels is dropped together with its label.
    """
    _, h, w = image.shape
    canvas = torch.full((3, size, size), FILL, dtype=image.dtype)
    ch, cw = min(size, h - top), min(size, w - left)
    canvas[:, :ch, :cw] = image[:, top : top + ch, left : left + cw]
    out = dict(target)
    if "mask" in target:
        m = torch.full((size, size), IGNORE, dtype=target["mask"].dtype)
        m[:ch, :cw] = target["mask"][top : top + ch, left : left + cw]
        out["mask"] = m
    if "boxes_xyxy" in target:
        b = target["boxes_xyxy"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
        # Clip to the part of the window the image actually covers.
        c = torch.stack(
            [b[:, 0].clamp(0, cw), b[:, 1].clamp(0, ch), b[:, 2].clamp(0, cw), b[:, 3].clamp(0, ch)], 1
        )
        cw_, ch_ = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
        keep = (cw_ >= MIN_SIDE) & (ch_ >= MIN_SIDE) & (cw_ * ch_ >= MIN_VISIBLE * area)
        out["boxes_xyxy"] = c[keep]
        out["labels"] = target["labels"][keep]
        for k in ("scores",):
            if k in target:
                out[k] = target[k][keep]
    return canvas, out


def letterbox(image: torch.Tensor, target: dict, size: int) -> tuple[torch.Tensor, dict, float]:
    """Resize the long side to `size`, pad to `size` x `size`. Returns the scale used."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        image, target = resize(image, target, scale)
    image, target = crop_pad(image, target, 0, 0, size)
    return image, target, scale


def apply_level(
    image: torch.Tensor,
    target: dict,
    level: str,
    size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Augment one sample at `level`; returns a `size` x `size` image and its target."""
    if level == "none":
        image, target, _ = letterbox(image, target, size)
        return image, target
    if level not in SCALE_RANGE:
        raise ValueError(f"unknown augment level {level!r}; known: {', '.join(LEVELS)}")
    if torch.rand((), generator=generator).item() < 0.5:
        image, target = hflip(image, target)
    # Scale jitter relative to the letterboxed size: the long side becomes size * s.
    h, w = image.shape[-2:]
    s = _uniform(*SCALE_RANGE[level], generator)
    image, target = resize(image, target, size * s / max(h, w))
    h, w = image.shape[-2:]
    top = int(torch.randint(0, max(1, h - size + 1), (), generator=generator))
    left = int(torch.randint(0, max(1, w - size + 1), (), generator=generator))
    return crop_pad(image, target, top, left, size)
