"""RetinaNet's batched decode gives the boxes, scores and labels of the per-image,
per-level decode it replaced (kept below as the reference), on random head outputs."""

import pytest
import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from detection.family import DetectionFamily
from tests.conftest import tiny_model_config

SIZES = [(128, 256), (100, 200), (128, 180), (60, 256), (128, 256)]  # (H, W) inside a 128 x 256 input


def reference_decode(model, outputs, image_sizes, min_score, topk_per_level, strict):
    """The decode as it was: one image and one level at a time."""
    anchors = outputs["anchors"]
    sizes = outputs["level_sizes"]
    k = model.num_classes
    results = []
    for i, hw in enumerate(image_sizes):
        boxes_all, scores_all, labels_all = [], [], []
        logits_levels = outputs["cls_logits"][i].float().split(sizes)
        reg_levels = outputs["bbox_regression"][i].float().split(sizes)
        for logits, reg, anc in zip(logits_levels, reg_levels, anchors.split(sizes)):
            scores = torch.sigmoid(logits).flatten()
            above = scores > min_score if strict else scores >= min_score
            keep = torch.nonzero(above).squeeze(1)
            if keep.numel() > topk_per_level:
                keep = keep[scores[keep].topk(topk_per_level).indices]
            anchor_idx = torch.div(keep, k, rounding_mode="floor")
            boxes = model.box_coder.decode_single(reg[anchor_idx], anc[anchor_idx])
            boxes_all.append(clip_boxes_to_image(boxes, hw))
            scores_all.append(scores[keep])
            labels_all.append(keep % k)
        results.append(
            {"boxes_xyxy": torch.cat(boxes_all), "scores": torch.cat(scores_all), "labels": torch.cat(labels_all)}
        )
    return results


def reference_candidates(model, outputs, image_sizes, min_score, topk_per_level):
    results = []
    for d in reference_decode(model, outputs, image_sizes, min_score, topk_per_level, strict=False):
        order = d["scores"].argsort(descending=True)
        results.append({k: v[order] for k, v in d.items()})
    return results


def reference_postprocess(model, outputs, image_sizes, score_thresh, nms_iou, max_detections, topk_per_level):
    results = []
    for d in reference_decode(model, outputs, image_sizes, score_thresh, topk_per_level, strict=True):
        keep = batched_nms(d["boxes_xyxy"], d["scores"], d["labels"], nms_iou)[:max_detections]
        results.append({k: v[keep] for k, v in d.items()})
    return results


@pytest.fixture(scope="module")
def head():
    """A tiny RetinaNet (3 classes) and random head outputs for a batch of 5 at 128 x 256.

    The scores are distinct (a permutation of evenly spaced values, no ties); image 1
    scores below 0.04 everywhere, so no candidate of it passes the thresholds used here."""
    torch.manual_seed(0)
    model = DetectionFamily().build_model(tiny_model_config()).eval()
    with torch.no_grad():
        out = model(torch.zeros(len(SIZES), 3, 128, 256, dtype=torch.uint8))
    b, a, k = out["cls_logits"].shape
    scores = (torch.randperm(b * a * k, dtype=torch.float64) + 0.5) / (b * a * k)
    scores = scores.view(b, a, k)
    scores[1] *= 0.04
    out["cls_logits"] = torch.logit(scores).float()
    out["bbox_regression"] = torch.randn(b, a, 4)
    return model, out


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g["labels"], w["labels"])
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=0)
        torch.testing.assert_close(g["boxes_xyxy"], w["boxes_xyxy"], rtol=1e-6, atol=1e-5)
        assert g["labels"].dtype == torch.int64 and g["boxes_xyxy"].device.type == "cpu"


@pytest.mark.parametrize("min_score, topk", [(0.5, 200), (0.0, 1000), (0.97, 40)])
def test_batched_candidates_are_the_per_image_ones(head, min_score, topk):
    model, out = head
    got = model.candidates(out, SIZES, min_score=min_score, topk_per_level=topk)
    want = reference_candidates(model, out, SIZES, min_score, topk)
    assert_same(got, want)
    counts = [len(d["scores"]) for d in got]
    if min_score > 0:
        assert counts[1] == 0  # the image without a score above the threshold
    assert all(n > 0 for i, n in enumerate(counts) if i != 1)
    # the per-level cap binds on the finest level: fewer candidates than pass the threshold
    assert min(counts[0], counts[2]) < (torch.sigmoid(out["cls_logits"][0]) >= min_score).sum()


@pytest.mark.parametrize(
    "score_thresh, nms_iou, max_detections, topk", [(0.05, 0.5, 100, 1000), (0.5, 0.3, 40, 200), (0.9, 0.7, 500, 50)]
)
def test_batched_postprocess_is_the_per_image_one(head, score_thresh, nms_iou, max_detections, topk):
    model, out = head
    got = model.postprocess(out, SIZES, score_thresh, nms_iou, max_detections, topk)
    want = reference_postprocess(model, out, SIZES, score_thresh, nms_iou, max_detections, topk)
    assert_same(got, want)
    counts = [len(d["scores"]) for d in got]
    assert counts[1] == 0 and all(0 < n <= max_detections for i, n in enumerate(counts) if i != 1)
    assert all((d["scores"][:-1] > d["scores"][1:]).all() for d in got)


def test_a_batch_without_candidates_gives_empty_detections(head):
    model, out = head
    got = model.postprocess(out, SIZES, score_thresh=0.999999)
    assert [len(d["scores"]) for d in got] == [0] * len(SIZES)
    assert all(d["boxes_xyxy"].shape == (0, 4) for d in got)
