"""The embedded synthetic world: seeded scenes of coloured shapes on textured backgrounds.

It stands in for COCO (detection), PASCAL VOC (segmentation) and ImageNet (the
unlabeled pool) in the demo and the tests: `write_world` writes all three layouts from
one generator, so a Noisy Student round runs end to end with no download.

A scene has 1..4 labelled objects (one class per shape kind, `WorldSpec.class_names`)
and a few unlabelled distractor shapes of other kinds, which are background. Shapes
have random size, aspect, rotation and colour (with a contrast floor against what lies
under them), overlap in draw order (later occludes earlier), and the image gets a
textured background and per-pixel Gaussian noise. Every knob lives in `WorldSpec`.

Pure numpy + PIL; no torch, no Prefect.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import storage
from data.files import atomic_write
from data.shards import brace_pattern, shard_name, write_shard

# Bump when the renderer changes what a (spec, seed) produces: a cached world written by
# an older renderer is then regenerated instead of silently reused.
WORLD_VERSION = 2

# Shape kinds the renderer knows. Labelled classes and distractors are drawn from here
# (disjointly); each is rasterized from a polygon (the ring from two).
SHAPE_KINDS = ("circle", "square", "triangle", "pentagon", "hexagon", "cross", "ring", "star", "line")
BACKGROUND_KINDS = ("gradient", "stripes", "checker", "blotches")

IGNORE = 255


@dataclass(frozen=True)
class WorldSpec:
    """How scenes are drawn. Ranges are inclusive `(low, high)` pairs.

    image_size: side of the square images, pixels.
    class_names: labelled shape kinds; class k has label k, COCO category id k+1 and
        mask value k+1. Each must be one of SHAPE_KINDS.
    objects_per_image: number of labelled objects drawn per scene (before the
        visibility rule drops heavily occluded ones).
    object_size: longest side of a shape before rotation, pixels.
    aspect: width/height ratio, drawn log-uniformly (circles become ellipses, squares
        rectangles).
    rotate: rotate shapes by a uniform random angle (circles/ellipses too).
    distractors_per_image: unlabelled shapes of `distractor_kinds`; they are background
        in masks and carry no box, but occlude objects like any shape.
    distractor_kinds: shape kinds used as distractors (disjoint from class_names).
    backgrounds: background texture kinds to choose from (BACKGROUND_KINDS).
    background_contrast: distance in RGB between the two colours of a texture.
    texture_period: stripe period / checker cell / blotch scale, pixels.
    noise_std: std of the per-pixel, per-channel Gaussian noise, intensity units.
    min_contrast: floor on the RGB distance between an object's colour and the mean
        colour of what it covers (background and earlier shapes).
    object_shading: peak-to-peak intensity of a linear shading ramp across each shape.
    min_visible: an object whose visible pixels are fewer than this fraction of its
        drawn pixels is dropped from the boxes and its visible pixels are marked
        ignore (255) in the mask.
    jpeg_quality: quality of the written JPEGs (train, val and unlabeled pool).

    Harder worlds: larger noise_std, background_contrast, texture_period spread and
    distractors_per_image; smaller min_contrast and object_size; more
    objects_per_image (more occlusion); lower min_visible (more partially visible
    objects kept); lower jpeg_quality.
    """

    image_size: int = 128
    class_names: tuple[str, ...] = ("circle", "square", "triangle")
    objects_per_image: tuple[int, int] = (1, 4)
    object_size: tuple[float, float] = (16.0, 56.0)
    aspect: tuple[float, float] = (0.6, 1.6)
    rotate: bool = True
    distractors_per_image: tuple[int, int] = (0, 2)
    distractor_kinds: tuple[str, ...] = ("cross", "ring", "star", "line")
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    background_contrast: tuple[float, float] = (10.0, 90.0)
    texture_period: tuple[float, float] = (4.0, 24.0)
    noise_std: float = 12.0
    min_contrast: float = 40.0
    object_shading: float = 40.0
    min_visible: float = 0.3
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        def pair(name: str, lo_min: float) -> None:
            v = getattr(self, name)
            if len(v) != 2 or not (lo_min <= v[0] <= v[1]):
                raise ValueError(f"WorldSpec.{name} must be (low, high) with {lo_min} <= low <= high, got {v}")

        if self.image_size < 8:
            raise ValueError(f"WorldSpec.image_size must be >= 8, got {self.image_size}")
        if not self.class_names:
            raise ValueError("WorldSpec.class_names is empty")
        for group, names in (("class_names", self.class_names), ("distractor_kinds", self.distractor_kinds)):
            unknown = [n for n in names if n not in SHAPE_KINDS]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"WorldSpec.{group} must be distinct names from {SHAPE_KINDS}, got {names}")
        shared = set(self.class_names) & set(self.distractor_kinds)
        if shared:
            raise ValueError(f"shapes {sorted(shared)} are both classes and distractors")
        bad_bg = [b for b in self.backgrounds if b not in BACKGROUND_KINDS]
        if not self.backgrounds or bad_bg:
            raise ValueError(
                f"WorldSpec.backgrounds must be a non-empty subset of {BACKGROUND_KINDS}, got {self.backgrounds}"
            )
        pair("objects_per_image", 0)
        pair("object_size", 1)
        pair("aspect", 1e-3)
        pair("distractors_per_image", 0)
        pair("background_contrast", 0)
        pair("texture_period", 1)
        if self.object_size[1] > self.image_size:
            raise ValueError(f"WorldSpec.object_size {self.object_size} exceeds image_size {self.image_size}")
        if self.distractors_per_image[1] > 0 and not self.distractor_kinds:
            raise ValueError("distractors requested but WorldSpec.distractor_kinds is empty")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"WorldSpec.min_visible must be in [0, 1], got {self.min_visible}")
        if self.noise_std < 0 or self.min_contrast < 0 or self.object_shading < 0:
            raise ValueError("WorldSpec.noise_std, min_contrast and object_shading must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"WorldSpec.jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> WorldSpec:
        """Inverse of `to_dict` (lists back to tuples; unknown keys rejected)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown WorldSpec fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Scene:
    """One rendered scene.

    image: uint8 [H,W,3] RGB (before JPEG compression).
    boxes_xyxy: float32 [N,4], tight box of each kept object's visible pixels, pixel-edge
        convention (pixel column x spans [x, x+1), so x1 = last column + 1).
    labels: int64 [N], class index 0..K-1, same order as boxes (draw order).
    mask: uint8 [H,W]; 0 background (distractors included), k+1 for class k, 255 the
        visible pixels of objects dropped by the `min_visible` rule.
    areas: float32 [N], visible pixel count of each kept object (COCO's `area`).
    """

    image: np.ndarray
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    areas: np.ndarray


@dataclass(frozen=True)
class WorldPaths:
    """Where `write_world` put things.

    images_dir: JPEGImages/ (train, val and holdout images, `{split}_{index:06d}.jpg`).
    train_annotations, val_annotations, holdout_annotations: COCO detection json files
    (the holdout split is labeled data no stage trains on: the audit's and soups').
    unlabeled_pattern: brace pattern of the unlabeled shards, absolute ('' if none).
    voc_root: root of the VOC layout (JPEGImages, SegmentationClass, ImageSets).
    """

    root: Path
    images_dir: Path
    train_annotations: Path
    val_annotations: Path
    holdout_annotations: Path
    unlabeled_pattern: str
    voc_root: Path
    num_classes: int
    class_names: tuple[str, ...]


# ------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Demo:
    """A family's demo on the embedded world (`noisy-student demo --family NAME`; each
    family names its own, engine/contract.py).

    presets: the full and the quick preset's names (configs/); world: what the world
    draws; data(world) -> (the config's data section pointing at a written world, the
    model's class count)."""

    presets: tuple[str, str]
    world: WorldSpec
    data: Callable[[WorldPaths], tuple[dict, int]]

    def preset(self, quick: bool) -> str:
        return self.presets[1] if quick else self.presets[0]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene, from (seed, split, index) alone.

    Scenes do not depend on generation order, and different splits draw from unrelated
    streams (the split name is hashed into the seed), so they never share scenes.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    split_id = int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel-centre coordinates, read-only because the cache shares them.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _unit_polygons(kind: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of a shape in a unit box centred at 0, with fill values (255 on, 0 cut out)."""

    def regular(n: int, r: float = 0.5, phase: float = -math.pi / 2) -> np.ndarray:
        t = phase + np.arange(n) * (2 * math.pi / n)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)

    if kind == "circle":
        return [(regular(48), 255)]
    if kind == "square":
        return [(np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]), 255)]
    if kind == "triangle":
        apex = rng.uniform(-0.3, 0.3)  # isosceles to scalene
        return [(np.array([[apex, -0.5], [0.5, 0.5], [-0.5, 0.5]]), 255)]
    if kind == "pentagon":
        return [(regular(5), 255)]
    if kind == "hexagon":
        return [(regular(6), 255)]
    if kind == "star":
        outer, inner = regular(5), regular(5, 0.2, -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], axis=1).reshape(-1, 2), 255)]
    if kind == "cross":
        a = 0.15
        pts = [(-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a),
               (a, 0.5), (-a, 0.5), (-a, a), (-0.5, a), (-0.5, -a), (-a, -a)]  # fmt: skip
        return [(np.array(pts), 255)]
    if kind == "ring":
        return [(regular(48), 255), (regular(48, rng.uniform(0.25, 0.38)), 0)]
    if kind == "line":
        t = rng.uniform(0.04, 0.1)
        return [(np.array([[-0.5, -t], [0.5, -t], [0.5, t], [-0.5, t]]), 255)]
    raise ValueError(f"unknown shape kind {kind!r}")


def _shape_mask(kind: str, spec: WorldSpec, rng: np.random.Generator) -> np.ndarray:
    """Boolean [S,S] mask of one randomly sized, rotated and placed shape."""
    size = spec.image_size
    longest = rng.uniform(*spec.object_size)
    lo, hi = spec.aspect
    aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if kind == "line":  # a line is long and thin whatever the aspect
        w = h = longest
    elif aspect >= 1:
        w, h = longest, longest / aspect
    else:
        w, h = longest * aspect, longest
    polys = _unit_polygons(kind, rng)
    theta = rng.uniform(0, 2 * math.pi) if spec.rotate else 0.0
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polys = [((p * [w, h]) @ rot.T, fill) for p, fill in polys]
    outer = polys[0][0]
    mn, mx = outer.min(axis=0), outer.max(axis=0)
    # Keep the whole shape inside the frame so its drawn area is all in the image;
    # if it cannot fit (rotated long shapes), centre the allowed range.
    offset = []
    for d in range(2):
        a, b = -mn[d], size - mx[d]
        offset.append(rng.uniform(a, b) if a <= b else (a + b) / 2)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for p, fill in polys:
        # PIL puts integer coordinates at pixel centres; shift by -0.5 so a pixel is on
        # when its centre (x + 0.5) is inside the continuous polygon.
        q = p + np.array(offset) - 0.5
        draw.polygon([tuple(v) for v in q.tolist()], fill=fill)
    return np.asarray(canvas) > 0


def _colour_pair(spec: WorldSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c1 = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    c2 = np.clip(c1 + direction * rng.uniform(*spec.background_contrast), 0, 255)
    return c1.astype(np.float32), c2.astype(np.float32)


def _background(spec: WorldSpec, rng: np.random.Generator) -> np.ndarray:
    """float32 [S,S,3] texture in 0..255."""
    size = spec.image_size
    xs, ys = _grid(size)
    kind = spec.backgrounds[rng.integers(len(spec.backgrounds))]
    c1, c2 = _colour_pair(spec, rng)
    angle = rng.uniform(0, math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    period = rng.uniform(*spec.texture_period)
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(u * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
    elif kind == "checker":
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:  # blotches: a coarse random field, upsampled smoothly
        cells = max(2, int(round(size / period / 2)))
        coarse = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    t = t.astype(np.float32)[..., None]
    return c1 + t * (c2 - c1)


def _object_colour(spec: WorldSpec, rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least `min_contrast` (RGB distance) from `under` (mean colour)."""
    for _ in range(16):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - under) >= spec.min_contrast:
            return c.astype(np.float32)
    # Rare fallback: each channel at the extreme farther from the covered colour gives a
    # distance >= 127.5 * sqrt(3), above any sensible floor.
    return np.where(under < 127.5, 255.0, 0.0).astype(np.float32)


def render_scene(spec: WorldSpec, seed: int, index: int, split: str) -> Scene:
    """Render scene `index` of `split` (any name; "train", "val", "unlabeled" are used).

    Deterministic in (spec, seed, split, index). See `Scene` for the output contract.
    """
    rng = scene_rng(seed, split, index)
    size = spec.image_size
    xs, ys = _grid(size)
    canvas = _background(spec, rng)

    n_obj = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    n_dis = int(rng.integers(spec.distractors_per_image[0], spec.distractors_per_image[1] + 1))
    # Objects are 0..n_obj-1; distractors follow. Random draw order mixes them, so a
    # distractor can lie under or over an object.
    order = rng.permutation(n_obj + n_dis)
    classes = rng.integers(spec.num_classes, size=n_obj)

    owner = np.full((size, size), -1, dtype=np.int16)  # object id per pixel, -1 none
    drawn_area = np.zeros(n_obj, dtype=np.int64)
    for item in order.tolist():
        if item < n_obj:
            kind = spec.class_names[classes[item]]
        else:
            kind = spec.distractor_kinds[rng.integers(len(spec.distractor_kinds))]
        m = _shape_mask(kind, spec, rng)
        if not m.any():
            continue
        under = canvas[m].mean(axis=0)
        colour = _object_colour(spec, rng, under)
        # A linear shading ramp across the shape, centred on its colour.
        phi = rng.uniform(0, 2 * math.pi)
        ramp = xs[m] * math.cos(phi) + ys[m] * math.sin(phi)
        span = float(ramp.max() - ramp.min())
        shade = (ramp - ramp.min()) / span - 0.5 if span > 0 else np.zeros_like(ramp)
        canvas[m] = colour + (spec.object_shading * shade)[:, None]
        if item < n_obj:
            owner[m] = item
            drawn_area[item] = int(m.sum())
        else:
            owner[m] = -1

    if spec.noise_std > 0:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(spec.noise_std)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    mask = np.zeros((size, size), dtype=np.uint8)
    boxes, labels, areas = [], [], []
    for item in order.tolist():  # boxes in draw order
        if item >= n_obj or drawn_area[item] == 0:
            continue
        vis = owner == item
        visible = int(vis.sum())
        if visible == 0:
            continue
        if visible < spec.min_visible * drawn_area[item]:
            mask[vis] = IGNORE
            continue
        mask[vis] = classes[item] + 1
        rows = np.flatnonzero(vis.any(axis=1))
        cols = np.flatnonzero(vis.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        labels.append(classes[item])
        areas.append(visible)
    return Scene(
        image=image,
        boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        mask=mask,
        areas=np.asarray(areas, dtype=np.float32),
    )


# ---------------------------------------------------------------------------- writing


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat list of 768 ints (index 255 -> 224,224,192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.extend((r, g, b))
    return pal


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 [H,W,3] RGB array."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_voc_png(mask: np.ndarray) -> bytes:
    """Palette ('P' mode) PNG bytes of a uint8 [H,W] class map, VOC colours."""
    h, w = mask.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _paths(root: Path, spec: WorldSpec, rel_pattern: str) -> WorldPaths:
    return WorldPaths(
        root=root,
        images_dir=root / "JPEGImages",
        train_annotations=root / "annotations" / "instances_train.json",
        val_annotations=root / "annotations" / "instances_val.json",
        holdout_annotations=root / "annotations" / "instances_holdout.json",
        unlabeled_pattern=str(root / rel_pattern) if rel_pattern else "",
        voc_root=root,
        num_classes=spec.num_classes,
        class_names=tuple(spec.class_names),
    )


# Files this module owns, removed before a regeneration so no stale scene survives.
_OWNED = {
    "JPEGImages": re.compile(r"^(train|val|holdout)_\d{6}\.jpg$"),
    "SegmentationClass": re.compile(r"^(train|val|holdout)_\d{6}\.png$"),
    "unlabeled": re.compile(r"^pool-\d{6}\.tar$"),
}


def _coco(spec: WorldSpec, split: str, scenes: list[tuple]) -> dict:
    """COCO detection dict from (name, (H, W), boxes_xyxy, labels, areas) per image."""
    images, annotations = [], []
    for image_id, (name, (h, w), boxes, labels, areas) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h})
        for box, label, area in zip(boxes.tolist(), labels.tolist(), areas.tolist()):
            x0, y0, x1, y1 = box
            # COCO's area is the object's pixel area (not its box area); it picks the
            # small/medium/large range in COCOeval.
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"noisy-student synthetic world, {split} split", "version": str(WORLD_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(spec.class_names)],
    }


def write_world(
    out_dir: str | os.PathLike,
    spec: WorldSpec = WorldSpec(),
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 200,
    n_unlabeled: int = 2000,
    per_shard: int = 250,
    *,
    n_holdout: int = 0,
) -> WorldPaths:
    """Write the world under `out_dir` and return its paths.

    Layout (one root serves as COCO image folder and VOC root):
      JPEGImages/{split}_{index:06d}.jpg          train, val and holdout images
      annotations/instances_{split}.json          COCO detection (category ids 1..K,
                                                  bbox xywh pixels, file_name relative
                                                  to JPEGImages)
      SegmentationClass/{split}_{index:06d}.png   VOC palette PNG masks (255 ignore)
      ImageSets/Segmentation/{split}.txt          VOC id lists
      unlabeled/pool-NNNNNN.tar                   webdataset shards, `u_{index:06d}.jpg`
      world.json                                  spec, seed, counts, shard pattern
    world.json is written last, atomically. If it already records the same renderer
    version, spec, seed, counts and per_shard (and the annotation and shard files
    exist), nothing is written; otherwise files this module owns are removed and the
    world regenerated. Unlabeled scenes come from split "unlabeled" (same distribution
    as train, different scenes), the holdout split (`n_holdout` images, none by default)
    from split "holdout": each split's scenes do not depend on the other splits' counts.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_holdout", n_holdout), ("n_unlabeled", n_unlabeled)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    root = storage.path(out_dir)
    root = root if storage.is_remote(root) else root.resolve()
    n_shards = math.ceil(n_unlabeled / per_shard)
    rel_pattern = f"unlabeled/{brace_pattern('pool', n_shards)}" if n_shards else ""
    shards = [f"unlabeled/{shard_name('pool', i)}" for i in range(n_shards)]
    identity = {
        "version": WORLD_VERSION,
        "spec": spec.to_dict(),
        "seed": seed,
        # (no holdout key without one: worlds written before the split existed stay valid)
        "counts": {"train": n_train, "val": n_val, "unlabeled": n_unlabeled}
        | ({"holdout": n_holdout} if n_holdout else {}),
        "per_shard": per_shard,
    }
    paths = _paths(root, spec, rel_pattern)
    manifest_path = root / "world.json"

    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
        if (
            isinstance(old, dict)
            and all(old.get(k) == v for k, v in identity.items())
            and paths.train_annotations.exists()
            and paths.val_annotations.exists()
            and (not n_holdout or paths.holdout_annotations.exists())
            and all((root / s).exists() for s in shards)
        ):
            return paths
        # Invalidate first: a crash during regeneration must not leave a world.json
        # that vouches for half-rewritten files.
        manifest_path.unlink()

    for sub, pattern in _OWNED.items():
        folder = root / sub
        if folder.is_dir():
            for entry in folder.iterdir():
                if pattern.match(entry.name):
                    entry.unlink()
    for sub in ("JPEGImages", "SegmentationClass", "annotations", "ImageSets/Segmentation", "unlabeled"):
        storage.makedirs(root / sub)

    splits = {"train": (n_train, paths.train_annotations), "val": (n_val, paths.val_annotations)}
    if n_holdout:
        splits["holdout"] = (n_holdout, paths.holdout_annotations)
    for split, (n, ann) in splits.items():
        scenes = []
        for i in range(n):
            scene = render_scene(spec, seed, i, split)
            name = f"{split}_{i:06d}"
            (paths.images_dir / f"{name}.jpg").write_bytes(encode_jpeg(scene.image, spec.jpeg_quality))
            (root / "SegmentationClass" / f"{name}.png").write_bytes(encode_voc_png(scene.mask))
            # Keep only what the COCO json needs, not the images.
            scenes.append((name, scene.mask.shape, scene.boxes_xyxy, scene.labels, scene.areas))
        _atomic_write_bytes(ann, json.dumps(_coco(spec, split, scenes)).encode())
        ids = "".join(f"{item[0]}\n" for item in scenes)
        _atomic_write_bytes(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids.encode())

    def pool(start: int, stop: int):
        for i in range(start, stop):
            scene = render_scene(spec, seed, i, "unlabeled")
            yield f"u_{i:06d}", {"jpg": encode_jpeg(scene.image, spec.jpeg_quality)}

    for s, rel in enumerate(shards):
        write_shard(root / rel, pool(s * per_shard, min((s + 1) * per_shard, n_unlabeled)))

    manifest = {
        **identity,
        "class_names": list(spec.class_names),
        "unlabeled_shards": shards,
        "unlabeled_pattern": rel_pattern,
    }
    _atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return paths
