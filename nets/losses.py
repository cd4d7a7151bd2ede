"""Per-group loss normalization shared by both families.

A student batch holds groups of images (human, then pseudo). Each group's loss is its
summed per-image loss divided by the group's count of supervised units: matched anchors
in detection, labeled pixels in segmentation. Normalizing each part by its own count
keeps a sparse part (a few confident pixels, few kept boxes) from weighing as much as a
dense one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_groups(group_sizes: Sequence[int] | None, batch: int) -> list[int]:
    """`group_sizes` as a list of ints that splits `batch` images (default one group)."""
    sizes = [batch] if group_sizes is None else [int(n) for n in group_sizes]
    if sum(sizes) != batch or min(sizes, default=0) < 0:
        raise ValueError(f"group sizes {sizes} do not split a batch of {batch} images")
    return sizes


def group_scale(units: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """Per-image factors [B] that turn summed per-image losses into group shares.

    units: float [B], each image's supervised units. Image i of a group of n images gets
    n / (the group's units, at least 1), so the mean over a group's entries is that
    group's loss, and a group without units gives 0. Under torch.distributed the units
    are counted over every rank's share of a group and each factor is multiplied by the
    number of ranks, because DDP averages gradients over ranks; every rank must call it
    with the same number of groups (the training step does).
    """
    counts = torch.stack([part.sum() for part in units.float().split(group_sizes)])
    ranks = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = torch.distributed.get_world_size()
        if ranks > 1:
            torch.distributed.all_reduce(counts)
    return torch.cat(
        [
            torch.full((n,), n * ranks, dtype=torch.float32, device=units.device) / c.clamp(min=1)
            for n, c in zip(group_sizes, counts)
        ]
    )
