"""Mean intersection-over-union from a confusion matrix (PASCAL VOC's metric).

Rows are ground-truth classes, columns predicted classes; pixels whose ground truth is
255 are left out. IoU_c = TP / (TP + FP + FN); the mean runs over the classes that
occur in the ground truth or the predictions (a class absent from both has no IoU).
"""

from __future__ import annotations

import torch

from data.augment import IGNORE


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [K,K] counts of (ground truth, prediction) over non-ignored pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    valid = target != IGNORE
    t, p = target[valid].long(), pred[valid].long()
    bad = t[t >= num_classes]
    if bad.numel():
        raise ValueError(f"ground-truth class {int(bad[0])} is outside 0..{num_classes - 1}")
    if p.numel() and int(p.max()) >= num_classes:
        raise ValueError(f"predicted class {int(p.max())} is outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def miou(conf: torch.Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """{"mIoU", "pixel_accuracy", "IoU/<class>"...} in percent from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    out = {
        "mIoU": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_accuracy": 100.0 * float(tp.sum() / conf.sum()) if conf.sum() > 0 else 0.0,
    }
    names = class_names or [str(k) for k in range(conf.shape[0])]
    for k, name in enumerate(names):
        if bool(present[k]):
            out[f"IoU/{name}"] = 100.0 * float(iou[k])
    return out
