"""`noisy-student augment preview`: a grid of augmented training samples, as a PNG.

Raw samples come from the configured labeled train set (`Family.labeled_dataset(...,
"train", None)`), go through `data.augment.apply_level` at the requested level and the
configured image size, and are drawn with their boxes (class names as labels) and, when
the target has a mask, the mask overlaid (classes in colour, ignore pixels in white).
With no config, the embedded synthetic world of the quick demo is written to a
temporary folder and used, so the command works out of the box.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from configs import RunConfig, load_config
from data.augment import IGNORE, apply_level

PADDING = 2  # pixels between grid cells
PALETTE = [
    "red", "lime", "blue", "yellow", "cyan", "magenta", "orange", "purple", "springgreen",
    "deepskyblue", "gold", "deeppink", "chartreuse", "tomato", "orchid", "turquoise",
]


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the grid holding `n` samples: as square as possible."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def grid_pixels(n: int, size: int, padding: int = PADDING) -> tuple[int, int]:
    """(width, height) in pixels of the PNG holding `n` samples of `size` x `size`."""
    rows, cols = grid_shape(n)
    return cols * (size + padding) + padding, rows * (size + padding) + padding


def render(image: torch.Tensor, target: dict, class_names: list[str] | None = None) -> torch.Tensor:
    """One augmented sample drawn: mask overlaid (if any), then boxes with class names."""
    if "mask" in target:
        mask = target["mask"]
        values = [int(v) for v in torch.unique(mask) if int(v) != 0]
        if values:
            masks = torch.stack([mask == v for v in values])
            colors = ["white" if v == IGNORE else PALETTE[v % len(PALETTE)] for v in values]
            image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colors)
    boxes = target.get("boxes_xyxy")
    if boxes is not None and len(boxes):
        labels = target["labels"].tolist()
        names = [class_names[k] if class_names and k < len(class_names) else str(k) for k in labels]
        if "scores" in target:
            names = [f"{nm} {s:.2f}" for nm, s in zip(names, target["scores"].tolist())]
        colors = [PALETTE[k % len(PALETTE)] for k in labels]
        image = draw_bounding_boxes(image, boxes, labels=names, colors=colors, width=1)
    return image


def preview_config(
    cfg: RunConfig, out: str | Path, level: str = "S3", n: int = 16, seed: int = 0
) -> dict:
    """Write the grid of `n` samples of `cfg`'s labeled train set augmented at `level`."""
    from tasks.families import get_family

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    family = get_family(cfg.family)
    dataset = family.labeled_dataset(cfg.data, "train", None)
    if len(dataset) == 0:
        raise ValueError("the labeled train set is empty")
    class_names = getattr(dataset, "class_names", None)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    tiles = []
    for i in range(n):
        image, target = dataset[order[i % len(order)]]
        image, target = apply_level(image, target, level, size, generator=g)
        tiles.append(render(image, target, class_names))
    _, cols = grid_shape(n)
    grid = make_grid(torch.stack(tiles), nrow=cols, padding=PADDING, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(out, format="PNG")
    rows, cols = grid_shape(n)
    return {"path": str(out), "level": level, "images": n, "grid": [rows, cols],
            "width": int(grid.shape[2]), "height": int(grid.shape[1]), "image_size": size}


def preview(
    out: str | Path,
    level: str = "S3",
    n: int = 16,
    config: str | Path | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    """The `augment preview` command. `config`: a YAML file or preset name; None = the demo world."""
    if config is not None:
        return preview_config(load_config(config, overrides), out, level, n, seed)
    from flows.demo import demo_config

    with tempfile.TemporaryDirectory(prefix="noisy-student-preview-") as tmp:
        cfg, _ = demo_config(tmp, seed, quick=True, overrides=overrides)
        return preview_config(cfg, out, level, n, seed)
