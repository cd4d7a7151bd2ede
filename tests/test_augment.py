"""S1 moves image, boxes and masks together (the paint test of docs/design.md, Augmentation)."""

import pytest
import torch
from torchvision.ops import box_iou

from data.augment import FILL, IGNORE, apply_level, hflip, letterbox


def painted_sample(h=96, w=128, seed=0):
    """An image with 3 disjoint boxes; the mask paints box i with value i+1."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[5.0, 6, 40, 30], [50, 40, 90, 90], [100, 10, 126, 60]])
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        mask[y0:y1, x0:x1] = i + 1
    target = {"boxes_xyxy": boxes, "labels": torch.tensor([0, 1, 2]), "mask": mask}
    return image, target


def region_box(mask, value):
    ys, xs = torch.nonzero(mask == value, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("level", ["none", "S1"])
def test_boxes_follow_the_painted_regions(level):
    for seed in range(60):
        image, target = painted_sample(seed=seed)
        g = torch.Generator().manual_seed(seed)
        out_img, out = apply_level(image, target, level, 128, generator=g)
        assert out_img.shape == (3, 128, 128) and out["mask"].shape == (128, 128)
        boxes = out["boxes_xyxy"]
        assert torch.isfinite(boxes).all()
        assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()
        for box, label in zip(boxes, out["labels"]):
            # labels stay with their boxes: box i was painted with i+1
            painted = region_box(out["mask"], int(label) + 1)
            assert box_iou(box[None], painted).item() >= 0.9, (seed, box, painted)


def test_s1_scale_jitter_range_and_flip():
    image, target = painted_sample(128, 128)
    widths, flips = [], 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        _, out = apply_level(image, {k: v for k, v in target.items() if k != "mask"}, "S1", 128, generator=g)
        # box 1 (40 px wide, central) is never cut by the crop
        b = out["boxes_xyxy"][out["labels"].tolist().index(1)]
        widths.append(float(b[2] - b[0]))
        flips += int(b[0] > 128 - 90)
    assert min(widths) >= 40 * 0.8 - 0.5 and max(widths) <= 40 * 1.2 + 0.5
    assert max(widths) - min(widths) > 12
    assert 60 < flips < 140  # flipped about half the time


def test_letterbox_pads_with_fill_and_ignore():
    image, target = painted_sample(64, 128)
    out_img, out, scale = letterbox(image, target, 256)
    assert scale == 2.0
    assert (out_img[:, 128:, :] == FILL).all() and (out["mask"][128:, :] == IGNORE).all()
    assert torch.allclose(out["boxes_xyxy"][0], torch.tensor([10.0, 12, 80, 60]))


def test_hflip_twice_is_identity():
    image, target = painted_sample()
    img2, t2 = hflip(*hflip(image, target))
    assert torch.equal(img2, image) and torch.equal(t2["mask"], target["mask"])
    assert torch.allclose(t2["boxes_xyxy"], target["boxes_xyxy"])


def test_unknown_level_is_named():
    image, target = painted_sample()
    with pytest.raises(ValueError, match="S9"):
        apply_level(image, target, "S9", 128)
