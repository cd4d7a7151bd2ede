"""The box pseudo-label rule and its sidecar encoding (RECIPE.md, Pseudo-labels).

Sidecar record `{key}.json`: {"boxes_xyxy": [[x0, y0, x1, y1], ...] in pixels of the
original image, "labels": [contiguous class ids], "scores": [teacher scores]}.
"""

from __future__ import annotations

import json

import torch
from torchvision.ops import batched_nms


def select_boxes(
    prediction: dict,
    score_threshold: float = 0.5,
    nms_iou: float = 0.5,
    max_boxes: int = 100,
    per_class_cap: int | None = None,
) -> dict | None:
    """Hard pseudo-label from a teacher prediction, or None if nothing is kept.

    Keeps boxes with score >= `score_threshold`, removes same-class overlaps above
    `nms_iou`, keeps at most `per_class_cap` boxes per class and `max_boxes` in all,
    highest scores first.
    """
    boxes, scores, labels = prediction["boxes_xyxy"], prediction["scores"], prediction["labels"]
    keep = torch.nonzero(scores >= score_threshold).squeeze(1)
    keep = keep[batched_nms(boxes[keep].float(), scores[keep].float(), labels[keep], nms_iou)]
    if per_class_cap is not None:
        # keep is in descending score order, so the rank of a box within its class is
        # the number of same-class boxes before it.
        lab = labels[keep]
        same = lab[:, None] == lab[None, :]
        rank = torch.tril(same, diagonal=-1).sum(1)
        keep = keep[rank < per_class_cap]
    keep = keep[:max_boxes]
    if keep.numel() == 0:
        return None
    return {
        "boxes_xyxy": boxes[keep].float().cpu(),
        "labels": labels[keep].long().cpu(),
        "scores": scores[keep].float().cpu(),
    }


def encode(label: dict) -> bytes:
    return json.dumps(
        {
            "boxes_xyxy": [[round(v, 2) for v in b] for b in label["boxes_xyxy"].tolist()],
            "labels": label["labels"].tolist(),
            "scores": [round(s, 4) for s in label["scores"].tolist()],
        },
        separators=(",", ":"),
    ).encode()


def decode(data: bytes) -> dict:
    raw = json.loads(data)
    return {
        "boxes_xyxy": torch.tensor(raw["boxes_xyxy"], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(raw["labels"], dtype=torch.int64),
        "scores": torch.tensor(raw.get("scores", [1.0] * len(raw["labels"])), dtype=torch.float32),
    }


SCORE_BINS = 10


def stats(label: dict, num_classes: int) -> dict:
    """Additive statistics of one kept image: summing them over images gives the pool's."""
    scores = label["scores"].clamp(0, 1 - 1e-6)
    return {
        "labels": int(label["labels"].numel()),
        "class_counts": torch.bincount(label["labels"], minlength=num_classes).tolist(),
        "score_hist": torch.bincount((scores * SCORE_BINS).long(), minlength=SCORE_BINS).tolist(),
    }
