"""Box- and mask-aware image ops of the augmentation policies (docs/recipe.md, Augmentation levels).

Every op has the signature `op(image, target, level, generator) -> (image, target)`:
`image` uint8 [3,H,W], `target` the sample's dict (`boxes_xyxy` float32 [N,4] pixels with
`labels` [N] and optional `scores` [N]; and/or `mask` uint8 [H,W], 255 = ignore), `level`
the policy magnitude on the 0-10 scale, `generator` the only source of randomness. Inputs
are never modified in place.

`op_param(name, level, size)` is the magnitude map: the op's parameter (degrees, shear
factor, pixels, enhance factor, bits, threshold) before its random sign. Pixel constants
were set for 640 px images and scale with `size / 640`; ops read `size` as the long side
of the image they act on (the training size, since the levels run them after the crop).

Geometry. Coordinates are continuous pixels: pixel (i, j) covers [j, j+1] x [i, i+1].
- Rotate/Shear act about the image centre through one forward affine matrix. The image
  is resampled bilinearly, the mask nearest; uncovered pixels get FILL / IGNORE. Boxes:
  the 4 corners go through the same matrix and the box becomes their enclosing box.
- Translate moves by whole pixels (exact for image and mask alike).
- After any move a box is clipped to the image; it is dropped with its label and score
  when its clipped area is under MIN_VISIBLE of its unclipped area or a side is under
  MIN_SIDE pixels (zero-area and non-finite boxes go too).
- `*_Only_BBoxes` ops act inside each box only (the pixels whose centres lie in the box),
  each box independently with probability `prob`; boxes are unchanged. The mask inside
  the box moves with the pixels (vacated mask pixels become IGNORE), so image and mask
  stay aligned.
- Cutout sets a square to FILL in the image and to IGNORE in the mask: the grey square
  shows nothing a segmenter could classify, so no pixel label is asked of it. Boxes stay
  (the occluded object is still there, as in the reference detection policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

FILL = 128  # image padding value (docs/recipe.md, Augmentation levels: fill value 128)
IGNORE = 255  # mask padding value

# A box cropped to less than this fraction of its area is dropped: too little is left
# of the object to call it one.
MIN_VISIBLE = 0.25
MIN_SIDE = 1.0  # pixels

MAX_LEVEL = 10.0
REF_SIZE = 640  # pixel constants below were set for this image size

ROTATE_MAX = 30.0  # degrees
SHEAR_MAX = 0.3
TRANSLATE_MAX = 250.0  # px, whole image
TRANSLATE_BBOX_MAX = 120.0  # px, inside each box (*_Only_BBoxes)
CUTOUT_MAX = 100.0  # px, half the side of the square (as in the reference `pad_size`)
ENHANCE_MIN, ENHANCE_SPAN = 0.1, 1.8  # factor 0.1 + 1.8 * level/10
POSTERIZE_MAX_DROP = 4  # bits kept: 8 - round(4 * level/10) -> 8 at level 0, 4 at 10
SOLARIZE_STEP = 25.6  # threshold 256 - 25.6 * level -> 256 (no-op) at 0, 0 (invert) at 10
SOLARIZE_ADD_MAX = 110.0  # added to pixels below SOLARIZE_ADD_THRESHOLD
SOLARIZE_ADD_THRESHOLD = 128

BOX_KEYS = ("labels", "scores")  # per-box entries that follow the boxes

Op = Callable[[torch.Tensor, dict, float, "torch.Generator | None"], tuple[torch.Tensor, dict]]


# ---------------------------------------------------------------- randomness helpers


def rand(generator: torch.Generator | None) -> float:
    return torch.rand((), generator=generator).item()


def randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, max(1, high), (), generator=generator))


def random_sign(generator: torch.Generator | None) -> float:
    return -1.0 if rand(generator) < 0.5 else 1.0


# ---------------------------------------------------------------- magnitude maps

# op name -> the kind of parameter it takes
_KIND = {
    "Rotate_BBox": "rotate",
    "Rotate": "rotate",
    "ShearX_BBox": "shear",
    "ShearY_BBox": "shear",
    "ShearX": "shear",
    "ShearY": "shear",
    "TranslateX_BBox": "translate",
    "TranslateY_BBox": "translate",
    "TranslateX": "translate",
    "TranslateY": "translate",
    "TranslateX_Only_BBoxes": "translate_bbox",
    "TranslateY_Only_BBoxes": "translate_bbox",
    "Cutout": "cutout",
    "Color": "enhance",
    "Contrast": "enhance",
    "Brightness": "enhance",
    "Sharpness": "enhance",
    "Posterize": "posterize",
    "Solarize": "solarize",
    "SolarizeAdd": "solarize_add",
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
}


def op_param(name: str, level: float, size: int = REF_SIZE) -> float | int | None:
    """The parameter of op `name` at `level` (0-10) for `size`-px images, before its sign.

    rotate: degrees; shear: factor; translate / translate_bbox / cutout: pixels (cutout:
    half the square's side); enhance: factor; posterize: bits kept; solarize: threshold;
    solarize_add: amount added. None for ops without a magnitude.
    """
    try:
        kind = _KIND[name]
    except KeyError:
        raise ValueError(f"unknown augment op {name!r}; known: {', '.join(sorted(_KIND))}") from None
    frac = float(level) / MAX_LEVEL
    scale = size / REF_SIZE
    match kind:
        case "rotate":
            return ROTATE_MAX * frac
        case "shear":
            return SHEAR_MAX * frac
        case "translate":
            return TRANSLATE_MAX * frac * scale
        case "translate_bbox":
            return TRANSLATE_BBOX_MAX * frac * scale
        case "cutout":
            return CUTOUT_MAX * frac * scale
        case "enhance":
            return ENHANCE_MIN + ENHANCE_SPAN * frac
        case "posterize":
            return int(8 - round(POSTERIZE_MAX_DROP * frac))
        case "solarize":
            return 256.0 - SOLARIZE_STEP * float(level)
        case "solarize_add":
            return SOLARIZE_ADD_MAX * frac
    return None


def _size(image: torch.Tensor) -> int:
    return max(image.shape[-2:])


# ---------------------------------------------------------------- boxes


def set_boxes(target: dict, boxes: torch.Tensor, w: int, h: int, keep: torch.Tensor | None = None) -> dict:
    """`target` with `boxes` (moved, unclipped) clipped to a w x h image.

    Boxes left with under MIN_VISIBLE of their area, a side under MIN_SIDE, or any
    non-finite coordinate are dropped together with their labels and scores.
    """
    b = boxes.to(torch.float32)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    c = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    cw, ch = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    ok = torch.isfinite(b).all(1) & (cw >= MIN_SIDE) & (ch >= MIN_SIDE) & (cw * ch >= MIN_VISIBLE * area)
    if keep is not None:
        ok &= keep
    out = dict(target)
    out["boxes_xyxy"] = c[ok]
    for k in BOX_KEYS:
        if k in target:
            out[k] = target[k][ok]
    return out


# ---------------------------------------------------------------- geometric ops


def _shift(t: torch.Tensor, dx: int, dy: int, fill: int) -> torch.Tensor:
    """Content of t [..., H, W] moved by (dx, dy) whole pixels; vacated pixels = fill."""
    h, w = t.shape[-2:]
    out = torch.full_like(t, fill)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = t[
        ..., max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
    ]
    return out


def translate(image: torch.Tensor, target: dict, dx: int, dy: int) -> tuple[torch.Tensor, dict]:
    """Move image, mask and boxes by (dx, dy) whole pixels."""
    _, h, w = image.shape
    out = dict(target)
    if "mask" in target:
        out["mask"] = _shift(target["mask"], dx, dy, IGNORE)
    if "boxes_xyxy" in target:
        moved = target["boxes_xyxy"] + torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        out = set_boxes(out, moved, w, h)
    return _shift(image, dx, dy, FILL), out


def warp_affine(image: torch.Tensor, target: dict, matrix: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Apply the forward affine `matrix` (3x3, continuous pixel coordinates) to the sample.

    Output pixel centres are mapped back through the inverse; the image is sampled
    bilinearly (FILL outside), the mask nearest (IGNORE outside). Boxes: enclosing box
    of the 4 transformed corners, then `set_boxes`.
    """
    _, h, w = image.shape
    m = matrix.to(torch.float64)
    norm = torch.tensor([[2.0 / w, 0, -1], [0, 2.0 / h, -1], [0, 0, 1]], dtype=torch.float64)
    theta = (norm @ torch.linalg.inv(m) @ torch.linalg.inv(norm))[:2].to(torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    # Sampling (x - fill) with zero padding gives `fill` outside, blended at the edges.
    img = F.grid_sample(image[None].float() - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = (img[0] + FILL).round_().clamp_(0, 255).to(image.dtype)
    out = dict(target)
    if "mask" in target:
        mk = target["mask"]
        mo = F.grid_sample(
            mk[None, None].float() - IGNORE, grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        out["mask"] = (mo[0, 0] + IGNORE).round_().to(mk.dtype)
    if "boxes_xyxy" in target:
        b = target["boxes_xyxy"].to(torch.float64)
        xs = b[:, [0, 2, 2, 0]]
        ys = b[:, [1, 1, 3, 3]]
        tx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        ty = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        moved = torch.stack([tx.amin(1), ty.amin(1), tx.amax(1), ty.amax(1)], 1)
        out = set_boxes(out, moved, w, h)
    return img, out


def _about_centre(a: list[list[float]], w: int, h: int) -> torch.Tensor:
    """3x3 matrix applying the linear map `a` (2x2) about the image centre."""
    cx, cy = w / 2.0, h / 2.0
    lin = torch.tensor(a, dtype=torch.float64)
    c = torch.tensor([cx, cy], dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64)
    m[:2, :2] = lin
    m[:2, 2] = c - lin @ c
    return m


def rotate(image: torch.Tensor, target: dict, degrees: float) -> tuple[torch.Tensor, dict]:
    """Rotate about the centre; positive = counter-clockwise on screen (y points down)."""
    if degrees == 0:
        return image, dict(target)
    _, h, w = image.shape
    r = math.radians(degrees)
    cos, sin = math.cos(r), math.sin(r)
    return warp_affine(image, target, _about_centre([[cos, sin], [-sin, cos]], w, h))


def shear(image: torch.Tensor, target: dict, factor: float, axis: str) -> tuple[torch.Tensor, dict]:
    """Shear about the centre: x' = x + f (y - cy) (axis "x") or y' = y + f (x - cx)."""
    if factor == 0:
        return image, dict(target)
    _, h, w = image.shape
    a = [[1.0, factor], [0.0, 1.0]] if axis == "x" else [[1.0, 0.0], [factor, 1.0]]
    return warp_affine(image, target, _about_centre(a, w, h))


def rotate_bbox(image, target, level, generator=None):
    deg = op_param("Rotate_BBox", level, _size(image)) * random_sign(generator)
    return rotate(image, target, deg)


def shear_x_bbox(image, target, level, generator=None):
    return shear(image, target, op_param("ShearX_BBox", level) * random_sign(generator), "x")


def shear_y_bbox(image, target, level, generator=None):
    return shear(image, target, op_param("ShearY_BBox", level) * random_sign(generator), "y")


def translate_x_bbox(image, target, level, generator=None):
    px = round(op_param("TranslateX_BBox", level, _size(image)) * random_sign(generator))
    return translate(image, target, px, 0)


def translate_y_bbox(image, target, level, generator=None):
    px = round(op_param("TranslateY_BBox", level, _size(image)) * random_sign(generator))
    return translate(image, target, 0, px)


def box_pixel_region(box: torch.Tensor, w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) index range of the pixels whose centres lie inside `box`."""
    x0, y0, x1, y1 = box.tolist()
    lo = lambda v, n: min(n, max(0, math.ceil(v - 0.5)))  # noqa: E731
    return lo(x0, w), lo(y0, h), lo(x1, w), lo(y1, h)


def _translate_only_bboxes(image, target, level, generator, prob, axis, name):
    if "boxes_xyxy" not in target or len(target["boxes_xyxy"]) == 0:
        return image, dict(target)
    _, h, w = image.shape
    # One sign per call (as in the reference); each box shifts with probability `prob`.
    px = round(op_param(name, level, _size(image)) * random_sign(generator))
    dx, dy = (px, 0) if axis == "x" else (0, px)
    image = image.clone()
    out = dict(target)
    mask = target["mask"].clone() if "mask" in target else None
    for box in target["boxes_xyxy"]:
        if rand(generator) >= prob or px == 0:
            continue
        x0, y0, x1, y1 = box_pixel_region(box, w, h)
        if x1 <= x0 or y1 <= y0:
            continue
        image[:, y0:y1, x0:x1] = _shift(image[:, y0:y1, x0:x1], dx, dy, FILL)
        if mask is not None:
            mask[y0:y1, x0:x1] = _shift(mask[y0:y1, x0:x1], dx, dy, IGNORE)
    if mask is not None:
        out["mask"] = mask
    return image, out


def translate_x_only_bboxes(image, target, level, generator=None, prob=1.0):
    return _translate_only_bboxes(image, target, level, generator, prob, "x", "TranslateX_Only_BBoxes")


def translate_y_only_bboxes(image, target, level, generator=None, prob=1.0):
    return _translate_only_bboxes(image, target, level, generator, prob, "y", "TranslateY_Only_BBoxes")


def cutout(image, target, level, generator=None):
    """A square of side 2 * op_param (clipped at the border) centred uniformly in the image."""
    _, h, w = image.shape
    pad = round(op_param("Cutout", level, _size(image)))
    cy, cx = randint(h, generator), randint(w, generator)
    out = dict(target)
    if pad <= 0:
        return image, out
    y0, y1, x0, x1 = max(0, cy - pad), min(h, cy + pad), max(0, cx - pad), min(w, cx + pad)
    image = image.clone()
    image[:, y0:y1, x0:x1] = FILL
    if "mask" in target:
        mask = target["mask"].clone()
        mask[y0:y1, x0:x1] = IGNORE
        out["mask"] = mask
    return image, out


# ---------------------------------------------------------------- pixel ops (target unchanged)


def _pixel(fn: Callable[[torch.Tensor, float], torch.Tensor], name: str) -> Op:
    def op(image, target, level, generator=None):
        return fn(image, op_param(name, level, _size(image))), dict(target)

    op.__name__ = name
    return op


def _solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(image.float() >= threshold, 255 - image, image)


def _solarize_add(image: torch.Tensor, amount: float) -> torch.Tensor:
    added = (image.to(torch.int16) + round(amount)).clamp(0, 255).to(image.dtype)
    return torch.where(image < SOLARIZE_ADD_THRESHOLD, added, image)


def _no_param(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Op:
    def op(image, target, level, generator=None):
        return fn(image), dict(target)

    op.__name__ = name
    return op


# ---------------------------------------------------------------- the table

OPS: dict[str, Op] = {
    # AutoAugment detection policy v0
    "TranslateX_BBox": translate_x_bbox,
    "TranslateY_BBox": translate_y_bbox,
    "TranslateX_Only_BBoxes": translate_x_only_bboxes,
    "TranslateY_Only_BBoxes": translate_y_only_bboxes,
    "ShearX_BBox": shear_x_bbox,
    "ShearY_BBox": shear_y_bbox,
    "Rotate_BBox": rotate_bbox,
    "Cutout": cutout,
    "Equalize": _no_param(TF.equalize, "Equalize"),
    "Sharpness": _pixel(TF.adjust_sharpness, "Sharpness"),
    "Color": _pixel(TF.adjust_saturation, "Color"),
    # RandAugment (the geometric ones are the box-aware ops above)
    "AutoContrast": _no_param(TF.autocontrast, "AutoContrast"),
    "Invert": _no_param(TF.invert, "Invert"),
    "Rotate": rotate_bbox,
    "Posterize": _pixel(lambda im, bits: TF.posterize(im, int(bits)), "Posterize"),
    "Solarize": _pixel(_solarize, "Solarize"),
    "Contrast": _pixel(TF.adjust_contrast, "Contrast"),
    "Brightness": _pixel(TF.adjust_brightness, "Brightness"),
    "ShearX": shear_x_bbox,
    "ShearY": shear_y_bbox,
    "TranslateX": translate_x_bbox,
    "TranslateY": translate_y_bbox,
    "SolarizeAdd": _pixel(_solarize_add, "SolarizeAdd"),
}

# Ops that move pixels (and so boxes and masks); the rest leave the geometry alone.
GEOMETRIC_OPS = (
    "TranslateX_BBox",
    "TranslateY_BBox",
    "ShearX_BBox",
    "ShearY_BBox",
    "Rotate_BBox",
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
# Ops that act inside each box with a per-box probability (they take `prob=`).
ONLY_BBOXES_OPS = ("TranslateX_Only_BBoxes", "TranslateY_Only_BBoxes")
