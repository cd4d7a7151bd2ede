"""COCO box AP through pycocotools' COCOeval (never reimplemented here)."""

from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(image_id: int, prediction: dict, category_ids: list[int]) -> list[dict]:
    """One image's prediction as COCO result dicts (bbox xywh, category id, score)."""
    out = []
    boxes = prediction["boxes_xyxy"].tolist()
    for (x0, y0, x1, y1), s, lab in zip(boxes, prediction["scores"].tolist(), prediction["labels"].tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[lab]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(s),
            }
        )
    return out


def coco_ap(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent over `image_ids`.

    No detections at all gives 0 everywhere (pycocotools cannot load an empty result).
    """
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that visible as 0.
    return {k: max(0.0, float(v) * 100.0) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
