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


# ---------------------------------------------------------------- the rule owns the filtering


def _teacher(score: float | list[float] | None = None, num_classes: int = 3):
    from detection.family import DetectionFamily
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    model = DetectionFamily().build_model(tiny_model_config(num_classes=num_classes))
    with torch.no_grad():
        if score is None:  # large random weights: confident, varied predictions
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        else:  # every anchor scores `score` (or score[c] for class c)
            cls = model.head.classification_head.cls_logits
            cls.weight.zero_()
            per_class = torch.tensor(score).expand(num_classes)
            cls.bias.copy_(torch.logit(per_class).repeat(cls.bias.numel() // num_classes))
    return model


IMAGES = [torch.full((3, 96, 128), 100, dtype=torch.uint8), torch.full((3, 128, 64), 30, dtype=torch.uint8)]


def test_threshold_below_the_evaluation_floor_keeps_low_scores():
    from configs import PseudoLabelConfig
    from detection.family import DetectionFamily

    family, model = DetectionFamily(), _teacher(score=0.02)
    labels = family.label_images(model, IMAGES, 128, PseudoLabelConfig(score_threshold=0.01))
    for lab in labels:
        assert lab is not None and len(lab["scores"]) > 0
        assert torch.allclose(lab["scores"], torch.tensor(0.02), atol=1e-4)
        assert len(lab["scores"]) <= 100
    assert family.label_images(model, IMAGES, 128, PseudoLabelConfig(score_threshold=0.03)) == [None, None]
    # evaluation keeps its own floor: nothing above 0.05 here
    assert all(len(p["scores"]) == 0 for p in family.predict(model, IMAGES, 128))


def test_per_class_cap_and_max_boxes_are_applied_once_after_nms():
    # Capping to max_boxes before the per-class cap would leave fewer boxes than the
    # rule allows: with one box per class and three classes, three boxes must come out.
    from configs import PseudoLabelConfig
    from detection.family import DetectionFamily

    family = DetectionFamily()
    model = _teacher(score=[0.9, 0.5, 0.3])  # class 0 outscores the others everywhere
    rule = PseudoLabelConfig(score_threshold=0.2, max_boxes=3, per_class_cap=1)
    for lab in family.label_images(model, IMAGES, 128, rule):
        assert lab["labels"].tolist() == [0, 1, 2]
    model = _teacher()
    rule = PseudoLabelConfig(score_threshold=0.0, max_boxes=150, nms_iou=0.5)
    cands = family._detect(model, IMAGES, 128, lambda out, sizes: model.candidates(out, sizes))
    for lab, cand in zip(family.label_images(model, IMAGES, 128, rule), cands):
        assert len(lab["scores"]) == min(150, len(pseudo.select_boxes(cand, 0.0, 0.5, 10**6)["scores"]))
        assert (lab["scores"][:-1] >= lab["scores"][1:]).all()
