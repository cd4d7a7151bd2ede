"""Pixel pseudo-labels (docs/recipe.md, Pseudo-labels): confident pixels keep the teacher's class.

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


def pixel_counts(scored: dict, target: dict, thresholds: list[float], num_classes: int) -> dict:
    """{"tp", "fp", "fn"}: int arrays [T, C] (see `SegmentationFamily.audit_counts`)."""
    gt = target["mask"].reshape(-1).long()
    valid = gt != IGNORE
    gt = gt[valid]
    pred = scored["mask"].reshape(-1).long()[valid]
    score = scored["score"].reshape(-1)[valid]
    correct = pred == gt
    n_gt = torch.bincount(gt, minlength=num_classes)[:num_classes]
    out = {k: np.zeros((len(thresholds), num_classes), np.int64) for k in ("tp", "fp", "fn")}
    for t, threshold in enumerate(thresholds):
        kept = score >= threshold
        tp = torch.bincount(pred[kept & correct], minlength=num_classes)[:num_classes]
        out["tp"][t] = tp.numpy()
        out["fp"][t] = torch.bincount(pred[kept & ~correct], minlength=num_classes)[:num_classes].numpy()
        out["fn"][t] = (n_gt - tp).numpy()
    return out


def draw_masks(image: torch.Tensor, label: dict | None, target: dict, zoom: int = 2) -> np.ndarray:
    """uint8 [H*zoom, 3*W*zoom + gaps, 3]: the image, its ground truth and the kept pixels
    side by side, classes in VOC colours, unlabeled pixels grey."""
    from data.world import voc_palette

    palette = np.array(voc_palette(), np.uint8).reshape(-1, 3)
    palette[IGNORE] = (160, 160, 160)

    def coloured(mask: torch.Tensor) -> np.ndarray:
        return palette[mask.numpy()]

    h, w = image.shape[-2:]
    kept = label["mask"] if label is not None else torch.full((h, w), IGNORE, dtype=torch.uint8)
    gap = np.full((h, 2, 3), 255, np.uint8)
    row = np.concatenate([image.permute(1, 2, 0).numpy(), gap, coloured(target["mask"]), gap, coloured(kept)], 1)
    return row.repeat(zoom, 0).repeat(zoom, 1)


def overlay_mask(image: torch.Tensor, label: dict | None, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H,W,3]: the image with its kept pixels blended in their VOC class colours
    (pixels left unlabeled, 255, and background keep the image's own colours)."""
    from data.world import voc_palette

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    if label is None:
        return rgb.astype(np.uint8)
    mask = label["mask"].cpu().numpy()
    palette = np.array(voc_palette(), np.float32).reshape(-1, 3)
    shown = (mask != IGNORE) & (mask != 0)
    rgb[shown] = (1 - alpha) * rgb[shown] + alpha * palette[mask[shown]]
    return rgb.astype(np.uint8)
