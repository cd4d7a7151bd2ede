"""Drawing augmented samples: boxes with class names, masks overlaid, tiles in a grid."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from data.augment import IGNORE

PADDING = 2  # pixels between grid cells
PALETTE = [
    "red",
    "lime",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "orange",
    "purple",
    "springgreen",
    "deepskyblue",
    "gold",
    "deeppink",
    "chartreuse",
    "tomato",
    "orchid",
    "turquoise",
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


def save_grid(tiles: list[torch.Tensor], out: str | Path) -> tuple[int, int]:
    """Write uint8 [3,S,S] tiles as one PNG grid; returns its (width, height)."""
    _, cols = grid_shape(len(tiles))
    grid = make_grid(torch.stack(tiles), nrow=cols, padding=PADDING, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(out, format="PNG")
    return int(grid.shape[2]), int(grid.shape[1])
