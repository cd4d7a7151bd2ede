"""The box pseudo-label rule and its sidecar encoding (docs/recipe.md, Pseudo-labels).

Sidecar record `{key}.json`: {"boxes_xyxy": [[x0, y0, x1, y1], ...] in pixels of the
original image, "labels": [contiguous class ids], "scores": [teacher scores]}.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou


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


def match_counts(label: dict, target: dict, thresholds: list[float], num_classes: int, iou: float) -> dict:
    """{"tp", "fp", "fn"}: int arrays [T, C] of the boxes of `label` scoring >= each
    threshold, matched to `target`'s boxes (see `DetectionFamily.audit_counts`)."""
    boxes, labels, scores = label["boxes_xyxy"], label["labels"], label["scores"]
    gt_boxes, gt_labels = target["boxes_xyxy"].float(), target["labels"].long()
    order = torch.argsort(scores, descending=True)
    boxes, labels, scores = boxes[order], labels[order], scores[order]
    matched = torch.zeros(len(scores), dtype=torch.bool)
    if len(scores) and len(gt_labels):
        overlaps = box_iou(boxes.float(), gt_boxes)
        overlaps[labels[:, None] != gt_labels[None, :]] = -1.0
        taken = torch.zeros(len(gt_labels), dtype=torch.bool)
        for i in range(len(scores)):
            row = overlaps[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            if row[j] >= iou:
                matched[i], taken[j] = True, True
    n_gt = np.bincount(gt_labels.numpy(), minlength=num_classes)[:num_classes]
    out = {k: np.zeros((len(thresholds), num_classes), np.int64) for k in ("tp", "fp", "fn")}
    lab = labels.numpy()
    for t, threshold in enumerate(thresholds):
        kept = (scores >= threshold).numpy()
        out["tp"][t] = np.bincount(lab[kept & matched.numpy()], minlength=num_classes)[:num_classes]
        out["fp"][t] = np.bincount(lab[kept & ~matched.numpy()], minlength=num_classes)[:num_classes]
        out["fn"][t] = n_gt - out["tp"][t]
    return out


def class_colour(c: int) -> tuple[int, int, int]:
    """A distinct bright colour per class (matplotlib's tab10 order)."""
    tab10 = [(31, 119, 180), (255, 127, 14), (214, 39, 40), (148, 103, 189), (140, 86, 75),
             (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (44, 160, 44)]  # fmt: skip
    return tab10[c % len(tab10)]


def draw_boxes(image: torch.Tensor, label: dict | None, target: dict, class_names: list[str], zoom: int = 2):
    """uint8 [H*zoom, W*zoom, 3]: the image with its ground-truth boxes (green, thin) and
    the kept labels (their class's colour, with class and score)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")
    im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for box in target["boxes_xyxy"].tolist():
        draw.rectangle([v * zoom for v in box], outline=(0, 230, 0), width=1)
    if label is not None:
        for box, c, s in zip(label["boxes_xyxy"].tolist(), label["labels"].tolist(), label["scores"].tolist()):
            xy = [v * zoom for v in box]
            draw.rectangle(xy, outline=class_colour(c), width=2)
            draw.text((xy[0] + 2, xy[1] + 1), f"{class_names[c]} {s:.2f}", fill=class_colour(c))
    return np.asarray(im)
