import json

import pytest
import torch

from data.coco import load_coco
from detection.evaluate import coco_ap, coco_results


@pytest.fixture
def coco(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 128, "height": 128} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [60, 60, 30, 50], "area": 1500, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [20, 30, 50, 50], "area": 2500, "iscrowd": 0},
    ]
    cats = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return load_coco(path)


def predictions(shift: float):
    # contiguous labels: category 5 -> 0, 9 -> 1
    return {
        1: {
            "boxes_xyxy": torch.tensor([[10.0 + shift, 10, 50 + shift, 40], [60, 60, 90, 110]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1]),
        },
        2: {
            "boxes_xyxy": torch.tensor([[20.0 + shift, 30, 70 + shift, 80]]),
            "scores": torch.tensor([0.7]),
            "labels": torch.tensor([0]),
        },
    }


def evaluate(coco, preds):
    results = [r for i, p in preds.items() for r in coco_results(i, p, [5, 9])]
    return coco_ap(coco, results, [1, 2])


def test_perfect_predictions_give_ap_100(coco):
    m = evaluate(coco, predictions(0.0))
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)


def test_shifted_boxes_score_less(coco):
    m = evaluate(coco, predictions(8.0))
    assert 0 < m["AP"] < 100
    assert m["AP"] < evaluate(coco, predictions(2.0))["AP"]


def test_no_predictions_give_zero(coco):
    assert coco_ap(coco, [], [1, 2])["AP"] == 0.0
