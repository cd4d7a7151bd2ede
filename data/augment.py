"""Augmentation levels shared by both families (docs/recipe.md, Augmentation levels).

A sample is `(image, target)`: image uint8 [3,H,W] RGB; target a dict holding
`boxes_xyxy` float32 [N,4] in pixels with `labels` int64 [N] (detection), and/or
`mask` uint8 [H,W] with 255 = ignore (segmentation). Every geometric op moves
image, boxes and mask together. Each level returns a `size` x `size` image.

Levels:
- "none": letterbox (resize the long side to `size`, pad bottom/right); evaluation
  and teacher inputs use this.
- "S1": horizontal flip, scale jitter (0.8, 1.2), then random crop/pad to `size`.
- "S2": S1, then the AutoAugment detection policy v0 (POLICY_V0): one of its 5
  sub-policies picked uniformly per image, each op applied with its probability
  (`*_Only_BBoxes` ops always run and draw their probability per box).
- "S3": as S2 with scale jitter (0.5, 2.0).
- "S4": flip, scale jitter (0.5, 2.0), crop/pad, then RandAugment: RANDAUGMENT_N ops
  (default 2) drawn uniformly with replacement from RANDAUGMENT_OPS, each applied at
  magnitude RANDAUGMENT_M (default 10), a fresh random sign per signed op.

The jitter range and RandAugment's N and M are settings (`Augment`, filled from a
stage's TrainConfig); the values above are their defaults. PASCAL VOC's recipe uses
the jitter (0.2, 1.5).

Order: flip + jitter + crop/pad come first and the policy acts on the `size` x `size`
training image. The policy's pixel constants (set for 640 px) then scale with the
training size alone (`size / 640`), whatever the source image size, so a magnitude
means the same fraction of the network input on every dataset; and the ops work on
the (often smaller) cropped image, which is cheaper. The price: fill from a translate
or rotate always lands inside the training frame instead of being partly cropped away.
(The reference EfficientDet pipeline runs the policy first, on the source image.)

The ops, their table OPS and their magnitude map `op_param` live in data/augment_ops.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.augment_ops import (  # noqa: F401  (re-exported: the public constants and ops)
    FILL,
    GEOMETRIC_OPS,
    IGNORE,
    MIN_SIDE,
    MIN_VISIBLE,
    ONLY_BBOXES_OPS,
    OPS,
    op_param,
    rand,
    set_boxes,
)

LEVELS = ("none", "S1", "S2", "S3", "S4")
SCALE_RANGE = {"S1": (0.8, 1.2), "S2": (0.8, 1.2), "S3": (0.5, 2.0), "S4": (0.5, 2.0)}

# AutoAugment detection policy v0: sub-policies of (op, probability, magnitude 0-10).
POLICY_V0: tuple[tuple[tuple[str, float, float], ...], ...] = (
    (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
    (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
    (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
    (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
    (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
)
POLICIES = {"S2": POLICY_V0, "S3": POLICY_V0}

RANDAUGMENT_N = 2  # ops per image
RANDAUGMENT_M = 10  # magnitude, 0-10
RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)


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
        out["mask"] = TF.resize(target["mask"][None], [nh, nw], interpolation=InterpolationMode.NEAREST_EXACT)[0]
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


def crop_pad(image: torch.Tensor, target: dict, top: int, left: int, size: int) -> tuple[torch.Tensor, dict]:
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
        # Clip to the part of the window the image actually covers.
        b = target["boxes_xyxy"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        out = set_boxes(out, b, cw, ch)
    return canvas, out


def letterbox(image: torch.Tensor, target: dict, size: int) -> tuple[torch.Tensor, dict, float]:
    """Resize the long side to `size`, pad to `size` x `size`. Returns the scale used."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        image, target = resize(image, target, scale)
    image, target = crop_pad(image, target, 0, 0, size)
    return image, target, scale


def autoaugment(
    image: torch.Tensor, target: dict, policy=POLICY_V0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict]:
    """One sub-policy of `policy`, picked uniformly; each op applied with its probability.

    `*_Only_BBoxes` ops always run and use the probability per box (docs/recipe.md, Augmentation levels).
    """
    sub = policy[int(torch.randint(0, len(policy), (), generator=generator))]
    for name, prob, level in sub:
        if name in ONLY_BBOXES_OPS:
            image, target = OPS[name](image, target, level, generator, prob=prob)
        elif rand(generator) < prob:
            image, target = OPS[name](image, target, level, generator)
    return image, target


def randaugment(
    image: torch.Tensor,
    target: dict,
    n: int = RANDAUGMENT_N,
    m: float = RANDAUGMENT_M,
    generator: torch.Generator | None = None,
    ops: tuple[str, ...] = RANDAUGMENT_OPS,
) -> tuple[torch.Tensor, dict]:
    """`n` ops drawn uniformly with replacement from `ops`, each always applied at magnitude `m`."""
    for _ in range(n):
        name = ops[int(torch.randint(0, len(ops), (), generator=generator))]
        image, target = OPS[name](image, target, m, generator)
    return image, target


def flip_jitter_crop(
    image: torch.Tensor,
    target: dict,
    size: int,
    scale_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Horizontal flip (p=0.5), scale jitter of the letterboxed size, random crop/pad to `size`."""
    if torch.rand((), generator=generator).item() < 0.5:
        image, target = hflip(image, target)
    # Scale jitter relative to the letterboxed size: the long side becomes size * s.
    h, w = image.shape[-2:]
    s = _uniform(*scale_range, generator)
    image, target = resize(image, target, size * s / max(h, w))
    h, w = image.shape[-2:]
    top = int(torch.randint(0, max(1, h - size + 1), (), generator=generator))
    left = int(torch.randint(0, max(1, w - size + 1), (), generator=generator))
    return crop_pad(image, target, top, left, size)


def apply_level(
    image: torch.Tensor,
    target: dict,
    level: str,
    size: int,
    generator: torch.Generator | None = None,
    *,
    scale_range: tuple[float, float] | None = None,
    randaugment_n: int | None = None,
    randaugment_m: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Augment one sample at `level`; returns a `size` x `size` image and its target.

    `scale_range` overrides the level's SCALE_RANGE (S1-S4); `randaugment_n` /
    `randaugment_m` override RANDAUGMENT_N / RANDAUGMENT_M at S4 (other levels ignore them).
    """
    if level == "none":
        image, target, _ = letterbox(image, target, size)
        return image, target
    if level not in SCALE_RANGE:
        raise ValueError(f"unknown augment level {level!r}; known: {', '.join(LEVELS)}")
    jitter = SCALE_RANGE[level] if scale_range is None else tuple(scale_range)
    image, target = flip_jitter_crop(image, target, size, jitter, generator)
    if level in POLICIES:
        image, target = autoaugment(image, target, POLICIES[level], generator)
    elif level == "S4":
        n = RANDAUGMENT_N if randaugment_n is None else randaugment_n
        m = RANDAUGMENT_M if randaugment_m is None else randaugment_m
        image, target = randaugment(image, target, n, m, generator)
    return image, target


@dataclass(frozen=True)
class Augment:
    """An augmentation level with its settings: `Augment("S4", randaugment_n=3)(image, target, size)`.

    scale_range: (min, max) of the scale jitter; None: the level's SCALE_RANGE.
    randaugment_n, randaugment_m: RandAugment's ops per image and magnitude (0-10) at S4.
    """

    level: str
    scale_range: tuple[float, float] | None = None
    randaugment_n: int = RANDAUGMENT_N
    randaugment_m: float = RANDAUGMENT_M

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown augment level {self.level!r}; known: {', '.join(LEVELS)}")

    def __call__(
        self, image: torch.Tensor, target: dict, size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        return apply_level(
            image,
            target,
            self.level,
            size,
            generator,
            scale_range=self.scale_range,
            randaugment_n=self.randaugment_n,
            randaugment_m=self.randaugment_m,
        )


def as_augment(spec: str | Augment | None) -> Augment | None:
    """A level name (with default settings) or an `Augment` as an `Augment`; None stays None."""
    if spec is None or isinstance(spec, Augment):
        return spec
    return Augment(spec)
