"""The pseudo-label audit: counts per threshold, recommendations, pictures, the stage."""

import json

import numpy as np
import pytest
import torch

from configs import DataConfig, PseudoLabelConfig, RunConfig, build_config
from detection.pseudo import match_counts
from engine import audit
from engine.families import FAMILIES, check_config
from segmentation.pseudo import pixel_counts
from tests.conftest import tiny_model_config


def test_boxes_match_once_per_ground_truth_in_score_order_and_by_class():
    target = {"boxes_xyxy": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}
    label = {
        "boxes_xyxy": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [50, 50, 60, 60]]),
        "labels": torch.tensor([0, 0, 0, 1]),  # a hit, its duplicate, a wrong class, a box on nothing
        "scores": torch.tensor([0.9, 0.6, 0.8, 0.3]),
    }
    c = match_counts(label, target, [0.1, 0.5, 0.85, 0.95], num_classes=2, iou=0.5)
    # class 0: the 0.9 box is the one hit; the 0.6 duplicate and the wrong-class 0.8 box are false
    assert c["tp"].tolist() == [[1, 0], [1, 0], [1, 0], [0, 0]]
    assert c["fp"].tolist() == [[2, 1], [2, 0], [0, 0], [0, 0]]
    assert c["fn"].tolist() == [[0, 1], [0, 1], [0, 1], [1, 1]]


def test_a_box_below_the_iou_does_not_match():
    target = {"boxes_xyxy": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}
    label = {"boxes_xyxy": torch.tensor([[5.0, 0, 15, 10]]), "labels": torch.tensor([0]), "scores": torch.tensor([1.0])}
    assert match_counts(label, target, [0.5], 1, iou=0.5)["tp"].tolist() == [[0]]  # IoU 1/3
    assert match_counts(label, target, [0.5], 1, iou=0.3)["tp"].tolist() == [[1]]


def test_pixels_count_by_class_and_threshold_ignoring_void():
    gt = torch.tensor([[0, 1], [1, 255]], dtype=torch.uint8)
    scored = {
        "mask": torch.tensor([[0, 1], [0, 1]], dtype=torch.uint8),
        "score": torch.tensor([[0.9, 0.4], [0.8, 1.0]]),
    }
    c = pixel_counts(scored, {"mask": gt}, [0.0, 0.5], num_classes=2)
    # at 0: (0,0) right as 0, (0,1) right as 1, (1,0) a 1 called 0; the void pixel counts nowhere
    assert c["tp"].tolist() == [[1, 1], [1, 0]]
    assert c["fp"].tolist() == [[1, 0], [1, 0]]
    assert c["fn"].tolist() == [[0, 1], [0, 2]]


def test_recommendations_from_counts():
    thresholds = [0.3, 0.5, 0.7]
    # over two classes: precision 0.5, 0.8, 1.0; recall 1.0, 0.8, 0.2
    counts = {
        "tp": np.array([[5, 5], [4, 4], [1, 1]]),
        "fp": np.array([[5, 5], [1, 1], [0, 0]]),
        "fn": np.array([[0, 0], [1, 1], [4, 4]]),
    }
    r = audit.summarize(counts, thresholds, ["a", "b"], target=0.9)
    assert r["all"]["precision"] == [0.5, 0.8, 1.0] and r["all"]["recall"] == [1.0, 0.8, 0.2]
    assert r["f1_threshold"] == 0.5 and r["f1"] == pytest.approx(0.8)
    assert r["precision_threshold"] == 0.7
    assert r["classes"]["a"]["labels"] == 5
    assert audit.summarize(counts, thresholds, ["a", "b"], target=1.0)["precision_threshold"] == 0.7
    never = {k: v.copy() for k, v in counts.items()}
    never["fp"][-1] = 1
    assert audit.summarize(never, thresholds, ["a", "b"], target=0.95)["precision_threshold"] is None
    assert audit.at(r, 0.52)["all"]["precision"] == 0.8


def test_nothing_kept_is_undefined_precision_not_zero():
    counts = {"tp": np.array([[0]]), "fp": np.array([[0]]), "fn": np.array([[3]])}
    r = audit.summarize(counts, [0.9], ["a"], target=0.5)
    assert r["all"]["precision"] == [None] and r["all"]["recall"] == [0.0]
    assert r["precision_threshold"] is None


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def _confident_model(family, cfg, scale: float = 1.0):
    torch.manual_seed(0)
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    with torch.no_grad():  # large random weights: confident, arbitrary predictions
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _rows(label: dict) -> list:
    """A label's entries as sorted rows: labels of tied scores may come in either order."""
    if "mask" in label:
        return [label["mask"].tolist()]
    return sorted(zip(label["boxes_xyxy"].tolist(), label["labels"].tolist(), label["scores"].tolist()))


def test_labels_at_a_threshold_are_the_rules_labels_at_it(family, small_world):
    where, _ = family.demo.data(small_world)
    cfg = DataConfig(**where, image_size=128, num_workers=0)
    model = _confident_model(family, cfg, scale=0.2)  # scores spread over (0, 1)
    holdout = family.labeled_dataset(cfg, "holdout", None)
    assert len(holdout) == 6
    images = [holdout[i][0] for i in range(3)]
    low = PseudoLabelConfig(score_threshold=0.05, max_boxes=20)
    scored = family.scored_labels(model, images, 128, low)
    for t in (0.3, 0.6):
        direct = family.label_images(model, images, 128, low.model_copy(update={"score_threshold": t}))
        for s, d in zip(scored, direct):
            got = family.at_threshold(s, t)
            assert (got is None) == (d is None)
            if d is not None:
                assert _rows(got) == _rows(d), t


def test_counts_are_consistent_and_the_panel_draws(family, small_world):
    where, _ = family.demo.data(small_world)
    cfg = DataConfig(**where, image_size=128, num_workers=0)
    model = _confident_model(family, cfg)
    image, target = family.labeled_dataset(cfg, "holdout", None)[0]
    (scored,) = family.scored_labels(model, [image], 128, PseudoLabelConfig(score_threshold=0.0))
    names = family.class_names(cfg)
    c = family.audit_counts(scored, target, [0.0, 0.5, 1.01], len(names), 0.5)
    assert c["tp"].shape == (3, len(names))
    assert (c["tp"] + c["fn"] == c["tp"][0] + c["fn"][0]).all()  # the ground truth does not change
    assert (np.diff(c["tp"] + c["fp"], axis=0) <= 0).all()  # a higher threshold keeps no more
    assert (c["tp"][-1] + c["fp"][-1] == 0).all()  # above every score nothing is kept
    panel = family.draw_audit(image, family.at_threshold(scored, 0.0), target, names)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    assert panel.shape[0] >= image.shape[1]


def test_config_names_what_auto_and_holdout_need():
    data = {"train_images": "i", "train_annotations": "a", "val_images": "i", "val_annotations": "b"}
    with pytest.raises(ValueError, match="audit.split"):
        build_config({"data": data, "pseudo": {"score_threshold": "auto"}})
    with pytest.raises(ValueError, match="data.holdout_images, data.holdout_annotations"):
        check_config(build_config({"data": data, "audit": {"split": "holdout"}}))
    with pytest.raises(ValueError, match=r"\[1.5\]"):
        build_config({"data": data, "audit": {"split": "val", "thresholds": [0.5, 1.5]}})
    cfg = build_config({"data": data, "audit": {"split": "val", "thresholds": [0.7, 0.3]}})
    assert cfg.audit.thresholds == (0.3, 0.7)
    # the held-out split is no training input: naming it changes no teacher or student digest
    assert RunConfig(data=DataConfig(**data, holdout_images="h", holdout_annotations="h.json")).digest_view() == (
        RunConfig(data=DataConfig(**data)).digest_view()
    )


def test_audit_writes_its_report_and_pictures(small_world, tmp_path):
    from engine.training import MODEL_FILE, _write_model

    family = FAMILIES["detection"]
    where, classes = family.demo.data(small_world)
    raw = {
        "data": {**where, "image_size": 128, "num_workers": 0},
        "model": tiny_model_config(num_classes=classes).model_dump(),
        "audit": {"split": "holdout", "images": 4, "grid_images": 3},
        "out_dir": str(tmp_path),
    }
    cfg = build_config(raw)
    model = _confident_model(family, cfg.data)
    _write_model(tmp_path / "teacher", "detection", cfg.model, model)
    report = audit.audit_teacher(
        cfg, str(tmp_path / "teacher" / MODEL_FILE), tmp_path / "audit", None, log=lambda m: None
    )
    assert report["images"] == 4 and report["split"] == "holdout"
    assert report["drawn_threshold"] == report["f1_threshold"]
    saved = json.loads((tmp_path / "audit" / audit.REPORT).read_text())
    assert saved["f1_threshold"] in saved["thresholds"]
    assert set(saved["classes"]) == set(family.class_names(cfg.data))
    from PIL import Image

    with Image.open(tmp_path / "audit" / audit.PR_PLOT) as im:
        assert im.format == "PNG" and im.width > 300
    with Image.open(tmp_path / "audit" / audit.GRID) as im:
        assert im.format == "JPEG" and im.width >= 3 * 256  # three zoomed 128 px panels in a row
