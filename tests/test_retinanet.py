import pytest
import torch

from detection.family import DetectionFamily
from detection.retinanet import LEVELS, cell_anchors
from tests.conftest import tiny_model_config

FAMILY = DetectionFamily()


def tiny(**kw):
    torch.manual_seed(0)
    return FAMILY.build_model(tiny_model_config(**kw))


def test_cell_anchor_values():
    a = cell_anchors(32.0, 3, (0.5, 1.0, 2.0))
    assert a.shape == (9, 4)
    # octave 0, ratio 1: a 32 x 32 square centred on 0
    assert torch.allclose(a[1], torch.tensor([-16.0, -16, 16, 16]))
    # ratio 2 (tall): h = 32 sqrt 2, w = 32 / sqrt 2, same area
    w, h = a[2, 2] - a[2, 0], a[2, 3] - a[2, 1]
    assert torch.isclose(h / w, torch.tensor(2.0)) and torch.isclose(w * h, torch.tensor(1024.0))
    # octave 2: scale 2^(2/3)
    assert torch.isclose(a[7, 2] - a[7, 0], torch.tensor(32 * 2 ** (2 / 3)))


def test_anchor_grid_and_output_shapes():
    model = tiny().eval()
    out = model(torch.zeros(2, 3, 128, 256, dtype=torch.uint8))
    sizes = [(128 // s) * (256 // s) * 9 for s in (8, 16, 32, 64, 128)]
    assert out["level_sizes"] == sizes
    assert out["cls_logits"].shape == (2, sum(sizes), 3)
    assert out["bbox_regression"].shape == (2, sum(sizes), 4)
    anchors = out["anchors"]
    # first anchor of p3: cell (0, 0) centred at (4, 4), size 4 * stride = 32
    assert torch.allclose(anchors[1], torch.tensor([4.0 - 16, 4 - 16, 4 + 16, 4 + 16]))
    # last anchor of p7 sits in the last cell, centred at (192, 64)
    centre = (anchors[-1, :2] + anchors[-1, 2:]) / 2
    assert torch.allclose(centre, torch.tensor([192.0, 64.0]))
    assert set(model.strides) >= set(LEVELS)


def test_input_not_multiple_of_128_is_refused():
    with pytest.raises(ValueError, match="multiple of 128"):
        tiny()(torch.zeros(1, 3, 100, 128))


def test_image_without_boxes_has_finite_loss_and_no_box_loss():
    model = tiny()
    targets = [
        {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes_xyxy": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([2])},
    ]
    losses = model.loss(model(torch.zeros(2, 3, 128, 128)), targets)
    assert losses["loss_cls"].shape == (2,) and torch.isfinite(losses["loss_cls"]).all()
    assert losses["loss_box"][0] == 0 and losses["loss_box"][1] > 0


def test_overfits_one_batch(small_world):
    from data.coco import CocoDetection

    ds = CocoDetection(small_world.images_dir, small_world.train_annotations, "none", 128)
    batch = FAMILY.collate([ds[i] for i in range(4)])
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = FAMILY.losses(model, batch)
        loss = sum(v.mean() for v in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


def test_predict_returns_boxes_in_the_original_frame():
    model = tiny()
    images = [torch.randint(0, 255, (3, 60, 100), dtype=torch.uint8), torch.zeros(3, 200, 90, dtype=torch.uint8)]
    model.train()
    preds = FAMILY.predict(model, images, 128)
    assert model.training  # mode restored
    for im, p in zip(images, preds):
        h, w = im.shape[-2:]
        b = p["boxes_xyxy"]
        assert len(b) <= 100
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert p["scores"].shape == p["labels"].shape == (len(b),)


def _fg_count(model, out, boxes):
    from torchvision.ops import box_iou

    return int((model.matcher(box_iou(boxes, out["anchors"])) >= 0).sum())


def _slice(out, rows):
    return {**out, "cls_logits": out["cls_logits"][rows], "bbox_regression": out["bbox_regression"][rows]}


EMPTY = {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_focal_loss_is_normalized_by_the_batch_positive_count():
    # Reference normalization: the batch's summed loss over the batch's matched anchors.
    # An image without foreground adds its background terms, not a normaliser of its
    # own (per image it would count as 1 positive, weighing like ~100 of them).
    model = tiny()
    boxed = {"boxes_xyxy": torch.tensor([[10.0, 10, 60, 50], [64, 64, 120, 124]]), "labels": torch.tensor([2, 0])}
    out = model(torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8))
    n_fg = _fg_count(model, out, boxed["boxes_xyxy"])
    assert n_fg > 1
    # single-image batches give the summed losses: the boxed one over its n_fg, the empty one over 1
    alone_boxed = model.loss(_slice(out, slice(0, 1)), [boxed])
    alone_empty = model.loss(_slice(out, slice(1, 2)), [EMPTY])
    both = model.loss(out, [boxed, EMPTY])
    for k in ("loss_cls", "loss_box"):
        total = alone_boxed[k].sum() * n_fg + alone_empty[k].sum()
        assert torch.isclose(both[k].mean(), total / n_fg, rtol=1e-5), k
    # the empty image's share is its background loss over the batch's positives, times B
    assert torch.isclose(both["loss_cls"][1], 2 * alone_empty["loss_cls"][0] / n_fg, rtol=1e-5)
    assert both["loss_box"][1] == 0


def test_human_and_pseudo_parts_are_normalized_by_their_own_positives():
    model = tiny()
    boxed = {"boxes_xyxy": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([1])}
    other = {"boxes_xyxy": torch.tensor([[30.0, 20, 110, 100]]), "labels": torch.tensor([0])}
    targets = [boxed, EMPTY, other]
    out = model(torch.randint(0, 255, (3, 3, 128, 128), dtype=torch.uint8))
    split = model.loss(out, targets, group_sizes=(2, 1))
    human = model.loss(_slice(out, slice(0, 2)), targets[:2])
    pseudo = model.loss(_slice(out, slice(2, 3)), targets[2:])
    for k in ("loss_cls", "loss_box"):
        assert torch.allclose(split[k][:2], human[k], rtol=1e-5), k
        assert torch.allclose(split[k][2:], pseudo[k], rtol=1e-5), k
    # the family reads the split from the batch (student batches carry num_human)
    torch.manual_seed(1)
    images = torch.randint(0, 255, (3, 3, 128, 128), dtype=torch.uint8)
    model.eval()  # same outputs for both calls
    fam = FAMILY.losses(model, {"images": images, "targets": targets, "num_human": 2})
    ref = model.loss(model(images), targets, group_sizes=(2, 1))
    assert all(torch.allclose(fam[k], ref[k]) for k in ref)
    whole = FAMILY.losses(model, {"images": images, "targets": targets})
    assert not torch.allclose(whole["loss_cls"], fam["loss_cls"])
    with pytest.raises(ValueError, match="do not split"):
        model.loss(out, targets, group_sizes=(2, 2))


@pytest.mark.parametrize("family_name", ["detection", "segmentation"])
@pytest.mark.parametrize("channels, groups", [(40, 20), (48, 24)])
def test_group_norm_heads_accept_widths_not_divisible_by_32(family_name, channels, groups):
    from segmentation.family import SegmentationFamily

    family = FAMILY if family_name == "detection" else SegmentationFamily()
    torch.manual_seed(0)
    model = family.build_model(tiny_model_config(neck_channels=channels, head_norm="group"))
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == groups and m.num_channels == channels for m in norms)
    out = model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    first = out["cls_logits"] if isinstance(out, dict) else out
    assert torch.isfinite(first).all()


def test_group_count_is_the_largest_divisor_up_to_32_with_two_channels_a_group():
    from nets.necks import group_count

    assert [group_count(c) for c in (32, 64, 256, 40, 48, 36, 8, 37)] == [16, 32, 32, 20, 24, 18, 4, 1]


def _level_maps(channels=32, batch=8, size=8):
    # levels with clearly different statistics, as P3..P7 activations have
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, size, size, generator=g) * (1 + lvl) + 3.0 * lvl for lvl in range(5)]


def test_batch_norm_head_statistics_are_per_level():
    head = tiny(head_norm="batch").head
    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:  # cumulative averages: after one forward, running stats = batch stats
        m.momentum = None
        m.reset_running_stats()
    maps = _level_maps()
    per_level = [m.shape[-2] * m.shape[-1] * 9 for m in maps]
    with torch.no_grad():
        head.train()
        train_out = head(maps)
        head.eval()
        eval_out = head(maps)
    # train and eval agree level by level: eval normalizes each level with its own statistics
    for key in ("cls_logits", "bbox_regression"):
        for lvl, (t, e) in enumerate(zip(train_out[key].split(per_level, 1), eval_out[key].split(per_level, 1))):
            # within 2% of the output's scale (only the unbiased running variance differs);
            # statistics blended over the levels miss by 3% to 140% here
            assert (t - e).abs().max() < 0.02 * t.abs().max(), (key, lvl)
    # each level's first BN holds that level's mean after the shared first conv
    for subnet in (head.classification_head, head.regression_head):
        assert len(subnet.norms) == 5 and len(subnet.convs) == 4
        for lvl, x in enumerate(maps):
            expected = subnet.convs[0](x).mean((0, 2, 3))
            assert torch.allclose(subnet.norms[lvl][0].running_mean, expected, atol=1e-4), lvl
        means = torch.stack([subnet.norms[lvl][0].running_mean for lvl in range(5)])
        assert (means[1:] - means[:-1]).abs().max() > 1e-2  # the levels really differ


def test_batch_norm_head_trains_through_the_model_and_group_head_keeps_its_layout():
    model = tiny(head_norm="batch")
    model.train()
    targets = [{"boxes_xyxy": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([1])}] * 2
    losses = model.loss(model(torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)), targets)
    sum(v.mean() for v in losses.values()).backward()
    conv = model.head.classification_head.convs[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    keys = set(model.state_dict())
    assert {"head.classification_head.norms.4.3.running_mean", "head.regression_head.predictor.weight"} <= keys
    # the GroupNorm head is torchvision's: checkpoints keep their keys
    group_keys = set(tiny(head_norm="group").state_dict())
    assert {
        "head.classification_head.conv.3.1.weight",
        "head.classification_head.cls_logits.bias",
        "head.regression_head.bbox_reg.weight",
    } <= group_keys
    assert not any("norms" in k for k in group_keys)
