import pytest
import torch

from detection import pseudo


def pred(boxes, scores, labels):
    return {
        "boxes_xyxy": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float64),
        "labels": torch.tensor(labels),
    }


def test_threshold_is_inclusive():
    p = pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.5, 0.4999], [0, 1])
    out = pseudo.select_boxes(p, score_threshold=0.5)
    assert out["labels"].tolist() == [0]
    assert out["scores"].tolist() == [0.5]


def test_empty_image_gives_none():
    assert pseudo.select_boxes(pred([[0, 0, 10, 10]], [0.3], [0]), 0.5) is None
    assert pseudo.select_boxes(pred(torch.zeros(0, 4).tolist(), [], []), 0.5) is None


def test_nms_is_per_class_and_max_boxes_caps():
    p = pred([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0])
    out = pseudo.select_boxes(p, 0.5, nms_iou=0.5)
    # the second box overlaps the first (same class) and goes; the class-1 twin stays
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    out = pseudo.select_boxes(p, 0.5, nms_iou=0.5, max_boxes=2)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])


def test_per_class_cap():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(5)]
    p = pred(boxes, [0.9, 0.8, 0.7, 0.6, 0.55], [0, 0, 0, 1, 1])
    out = pseudo.select_boxes(p, 0.5, per_class_cap=1)
    assert out["labels"].tolist() == [0, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.6])


def test_encode_decode_roundtrip_and_stats():
    p = pseudo.select_boxes(pred([[1.234, 2, 30.5, 40], [5, 5, 9, 9]], [0.91, 0.55], [2, 0]), 0.5)
    back = pseudo.decode(pseudo.encode(p))
    assert torch.allclose(back["boxes_xyxy"], p["boxes_xyxy"], atol=0.01)
    assert back["labels"].tolist() == p["labels"].tolist()
    s = pseudo.stats(back, num_classes=3)
    assert s["labels"] == 2 and s["class_counts"] == [1, 0, 1]
    assert sum(s["score_hist"]) == 2 and s["score_hist"][9] == 1 and s["score_hist"][5] == 1
