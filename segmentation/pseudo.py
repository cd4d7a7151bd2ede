"""Pixel pseudo-labels (RECIPE.md, Pseudo-labels): confident pixels keep the teacher's class.

A teacher prediction is `{"mask": uint8 [H,W] argmax class, "score": float32 [H,W]
max probability}` in the image's own pixel frame. The rule keeps a pixel when its
score is at least the threshold and marks the rest 255 (ignore); an image with no
kept pixel gets no pseudo-label. Sidecars are grey-scale PNGs of the class map
(lossless; 255 = ignore).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from data.augment import IGNORE

SHARE_BINS = 10  # histogram of the kept-pixel share per image, in tenths


def select_pixels(prediction: dict, threshold: float) -> dict | None:
    """{"mask": uint8 [H,W]} with pixels scoring below `threshold` set to 255, or None."""
    keep = prediction["score"] >= threshold
    if not bool(keep.any()):
        return None
    mask = torch.where(keep, prediction["mask"].to(torch.uint8), torch.tensor(IGNORE, dtype=torch.uint8))
    return {"mask": mask}


def encode(label: dict) -> bytes:
    mask = label["mask"]
    if mask.dtype != torch.uint8 or mask.dim() != 2:
        raise ValueError(f"a pixel pseudo-label is a uint8 [H,W] mask, got {mask.dtype} {tuple(mask.shape)}")
    buf = io.BytesIO()
    Image.fromarray(mask.numpy(), mode="L").save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return {"mask": torch.from_numpy(np.array(im, dtype=np.uint8))}


def stats(label: dict, num_classes: int) -> dict:
    """Additive counts: kept pixels ("labels"), all pixels, kept pixels per class, and a
    histogram of the kept share per image."""
    mask = label["mask"]
    kept = mask[mask != IGNORE].long()
    share = kept.numel() / max(1, mask.numel())
    hist = [0] * SHARE_BINS
    hist[min(SHARE_BINS - 1, int(share * SHARE_BINS))] += 1
    return {
        "labels": int(kept.numel()),
        "pixels": int(mask.numel()),
        "class_counts": torch.bincount(kept, minlength=num_classes)[:num_classes].tolist(),
        "kept_share_hist": hist,
    }
