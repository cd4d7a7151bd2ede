"""`noisy-student augment preview`: a grid of augmented training samples, as a PNG.

Raw samples come from the configured labeled train set (`Family.labeled_dataset(...,
"train", None)`), go through `data.augment.apply_level` at the requested level and the
configured image size, and are drawn with their boxes (class names as labels) and, when
the target has a mask, the mask overlaid (classes in colour, ignore pixels in white).
With no config, the embedded synthetic world of the quick demo is written to a
temporary folder and used, so the command works out of the box.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from configs import RunConfig, load_config
from data.augment import apply_level
from data.preview import grid_pixels, grid_shape, render, save_grid  # noqa: F401 (re-exported)


def preview_config(cfg: RunConfig, out: str | Path, level: str = "S3", n: int = 16, seed: int = 0) -> dict:
    """Write the grid of `n` samples of `cfg`'s labeled train set augmented at `level`."""
    from engine.families import get_family

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    family = get_family(cfg.family)
    dataset = family.labeled_dataset(cfg.data, "train", None)
    if len(dataset) == 0:
        raise ValueError("the labeled train set is empty")
    class_names = family.class_names(cfg.data)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    tiles = []
    for i in range(n):
        image, target = dataset[order[i % len(order)]]
        image, target = apply_level(image, target, level, size, generator=g)
        tiles.append(render(image, target, class_names))
    width, height = save_grid(tiles, out)
    rows, cols = grid_shape(n)
    return {
        "path": str(out),
        "level": level,
        "images": n,
        "grid": [rows, cols],
        "width": width,
        "height": height,
        "image_size": size,
    }


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
