"""S2-S4: box- and mask-aware policy ops (docs/recipe.md, Augmentation levels; docs/design.md, Augmentation).

The paint test: each box i is painted into the mask with value i+1 (and into the image
with a matching grey level) before an op; afterwards the painted region must sit where
the op says the box is, labels and scores must stay with their boxes, and the image must
still agree with the mask.
"""

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from data import augment
from data.augment import (
    FILL,
    GEOMETRIC_OPS,
    IGNORE,
    LEVELS,
    ONLY_BBOXES_OPS,
    OPS,
    POLICY_V0,
    RANDAUGMENT_OPS,
    apply_level,
    flip_jitter_crop,
    op_param,
)
from data.augment_ops import box_pixel_region

SIZE = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: a second intra-op thread only adds barrier waits (badly so on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# mask value -> image grey level (ignore <-> the image fill value)
SHADES = {0: 20, 1: 60, 2: 100, 3: 170, 4: 215, IGNORE: FILL}


def painted_sample(seed: int, h: int = SIZE, w: int = SIZE, noise: bool = False):
    """4 disjoint random boxes, one per quadrant, painted into mask and image."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for qy in range(2):
        for qx in range(2):
            cw, chh = w / 2, h / 2
            x0 = qx * cw + 6 + torch.rand((), generator=g).item() * cw * 0.3
            y0 = qy * chh + 6 + torch.rand((), generator=g).item() * chh * 0.3
            x1 = qx * cw + cw - 6 - torch.rand((), generator=g).item() * cw * 0.3
            y1 = qy * chh + chh - 6 - torch.rand((), generator=g).item() * chh * 0.3
            boxes.append([round(x0), round(y0), round(x1), round(y1)])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3])
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        mask[y0:y1, x0:x1] = i + 1
    if noise:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    else:
        image = shade(mask)
    target = {"boxes_xyxy": boxes, "labels": labels, "scores": (labels + 1) / 10.0, "mask": mask, "image_id": 7}
    return image, target


def shade(mask):
    lut = torch.zeros(256, dtype=torch.uint8)
    for v, s in SHADES.items():
        lut[v] = s
    return lut[mask.long()][None].expand(3, -1, -1).clone()


def region_box(mask, value):
    ys, xs = torch.nonzero(mask == value, as_tuple=True)
    if len(ys) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def check_boxes_follow_paint(image, out):
    """Returns the number of boxes compared strictly (IoU)."""
    h, w = out["mask"].shape
    boxes, labels = out["boxes_xyxy"], out["labels"]
    assert boxes.dtype == torch.float32 and boxes.shape[1:] == (4,)
    assert len(labels) == len(boxes) == len(out["scores"])
    assert torch.isfinite(boxes).all()
    assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert torch.allclose(out["scores"], (labels + 1) / 10.0), "scores must follow their boxes"
    assert len(set(labels.tolist())) == len(labels)
    overlaps = box_iou(boxes, boxes) > 0
    strict = 0
    for i, (box, label) in enumerate(zip(boxes, labels)):
        painted = region_box(out["mask"], int(label) + 1)
        x0, y0, x1, y1 = box_pixel_region(box, w, h)
        has_ignore = bool((out["mask"][y0:y1, x0:x1] == IGNORE).any())
        if painted is None:
            # Only an op inside the box (or cutout) can have emptied it.
            assert has_ignore, (box, label)
            continue
        if not overlaps[i].sum() > 1:
            # The painted object lies inside its box (labels stay with their boxes).
            assert (painted[:2] >= box[:2] - 1.5).all() and (painted[2:] <= box[2:] + 1.5).all(), (box, painted)
        at_border = bool(box[0] < 1 or box[1] < 1 or box[2] > w - 1 or box[3] > h - 1)
        if at_border or has_ignore:
            continue  # clipped, or partly hidden by fill: the region is a subset only
        if min(box[2] - box[0], box[3] - box[1]) >= 20:
            assert box_iou(box[None], painted[None]).item() >= 0.9, (box, painted)
        else:  # small boxes: a pixel of rounding is a large IoU change
            assert (box - painted).abs().max() <= 2.0, (box, painted)
        strict += 1
    return strict


def check_image_agrees_with_mask(image, mask, min_agree=0.99):
    """Away from region edges, every pixel's grey level is its mask value's shade."""
    m = mask.long()
    pad = torch.nn.functional.pad(m[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    interior = torch.ones_like(m, dtype=torch.bool)
    for dy in range(3):
        for dx in range(3):
            interior &= pad[dy : dy + m.shape[0], dx : dx + m.shape[1]].long() == m
    expected = shade(mask)[0].int()
    agree = ((image[0].int() - expected).abs() <= 2) & interior
    assert interior.sum() > 0.5 * m.numel()
    assert agree.sum().item() >= min_agree * interior.sum().item()


# ---------------------------------------------------------------- geometric ops, paint test


@pytest.mark.parametrize("name", GEOMETRIC_OPS)
def test_geometric_ops_move_boxes_and_masks_together(name):
    strict = 0
    for level in range(11):
        for seed in range(20):
            image, target = painted_sample(seed * 11 + level)
            g = torch.Generator().manual_seed(seed)
            out_img, out = OPS[name](image, target, level, g)
            assert out_img.shape == image.shape and out_img.dtype == torch.uint8
            assert out["mask"].shape == target["mask"].shape and out["image_id"] == 7
            strict += check_boxes_follow_paint(out_img, out)
            check_image_agrees_with_mask(out_img, out["mask"])
    assert strict > 500  # most boxes were compared exactly


@pytest.mark.parametrize("name", ONLY_BBOXES_OPS)
def test_only_bboxes_ops_keep_boxes_and_outside_pixels(name):
    for level in range(11):
        for seed in range(4):
            image, target = painted_sample(seed * 11 + level, noise=True)
            g = torch.Generator().manual_seed(seed)
            out_img, out = OPS[name](image, target, level, g, prob=1.0)
            assert torch.equal(out["boxes_xyxy"], target["boxes_xyxy"])
            assert torch.equal(out["labels"], target["labels"])
            inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            for box in target["boxes_xyxy"]:
                x0, y0, x1, y1 = box_pixel_region(box, SIZE, SIZE)
                inside[y0:y1, x0:x1] = True
            assert torch.equal(out_img[:, ~inside], image[:, ~inside])
            assert torch.equal(out["mask"][~inside], target["mask"][~inside])
            shift = round(op_param(name, level, SIZE))
            if shift:  # the content inside moved by exactly `shift` pixels
                x0, y0, x1, y1 = box_pixel_region(target["boxes_xyxy"][0], SIZE, SIZE)
                a, b = image[:, y0:y1, x0:x1], out_img[:, y0:y1, x0:x1]
                axis = -1 if name.startswith("TranslateX") else -2
                n = a.shape[axis]
                if shift >= n:  # everything inside moved out
                    assert (b == FILL).all()
                    continue
                fwd = torch.equal(b.narrow(axis, shift, n - shift), a.narrow(axis, 0, n - shift))
                back = torch.equal(b.narrow(axis, 0, n - shift), a.narrow(axis, shift, n - shift))
                assert fwd or back
            else:
                assert torch.equal(out_img, image)


def test_only_bboxes_probability_is_per_box():
    changed = 0
    for seed in range(50):
        image, target = painted_sample(seed, noise=True)
        out_img, _ = OPS["TranslateY_Only_BBoxes"](image, target, 10, torch.Generator().manual_seed(seed), prob=0.5)
        for box in target["boxes_xyxy"]:
            x0, y0, x1, y1 = box_pixel_region(box, SIZE, SIZE)
            changed += int(not torch.equal(out_img[:, y0:y1, x0:x1], image[:, y0:y1, x0:x1]))
    assert 70 < changed < 130  # of 200 boxes, about half
    image, target = painted_sample(0, noise=True)
    out_img, _ = OPS["TranslateY_Only_BBoxes"](image, target, 10, torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(out_img, image)


def test_only_bboxes_ops_keep_image_and_mask_aligned():
    for seed in range(20):
        image, target = painted_sample(seed)
        out_img, out = OPS["TranslateY_Only_BBoxes"](image, target, 8, torch.Generator().manual_seed(seed))
        check_image_agrees_with_mask(out_img, out["mask"], min_agree=1.0)


def test_rotation_drops_boxes_pushed_out_and_their_labels():
    # A box in the corner leaves the image under a 30 degree rotation of a wide image.
    image = torch.full((3, 64, 256), 50, dtype=torch.uint8)
    target = {
        "boxes_xyxy": torch.tensor([[0.0, 0, 20, 20], [118, 22, 138, 42]]),
        "labels": torch.tensor([5, 6]),
        "scores": torch.tensor([0.5, 0.6]),
    }
    _, out = augment.OPS["Rotate_BBox"](image, target, 10, torch.Generator().manual_seed(0))
    assert out["labels"].tolist() == [6] and out["scores"].tolist() == [pytest.approx(0.6)]


# ---------------------------------------------------------------- whole levels


@pytest.mark.parametrize("level", ["S2", "S3", "S4"])
def test_levels_move_boxes_and_masks_together(level):
    strict = 0
    for seed in range(200):
        image, target = painted_sample(seed, h=96, w=160)
        out_img, out = apply_level(image, target, level, SIZE, generator=torch.Generator().manual_seed(seed))
        assert out_img.shape == (3, SIZE, SIZE) and out["mask"].shape == (SIZE, SIZE)
        strict += check_boxes_follow_paint(out_img, out)
    assert strict > 200


def test_s1_and_geometric_only_pipelines_keep_image_and_mask_aligned():
    for seed in range(20):
        image, target = painted_sample(seed, h=96, w=160)
        g = torch.Generator().manual_seed(seed)
        img, out = flip_jitter_crop(image, target, SIZE, (0.5, 2.0), g)
        for name in ("Rotate_BBox", "ShearX_BBox", "TranslateY_BBox"):
            img, out = OPS[name](img, out, 7, g)
        check_image_agrees_with_mask(img, out["mask"], min_agree=0.98)


def test_levels_work_without_boxes_or_without_mask():
    image, target = painted_sample(0)
    seg = {"mask": target["mask"]}
    det = {k: v for k, v in target.items() if k != "mask"}
    empty = {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    for level in LEVELS:
        for seed in range(15):
            for t in (seg, det, empty):
                img, out = apply_level(image, t, level, SIZE, generator=torch.Generator().manual_seed(seed))
                assert img.shape == (3, SIZE, SIZE) and set(out) == set(t)


@pytest.mark.parametrize("level", ["S2", "S3", "S4"])
def test_same_seed_same_output(level):
    image, target = painted_sample(3, h=96, w=160)
    outs = []
    for seed in (11, 11, 12):
        results = [
            apply_level(image, target, level, SIZE, generator=torch.Generator().manual_seed(seed + k)) for k in range(8)
        ]
        outs.append(results)
    for (ia, ta), (ib, tb) in zip(outs[0], outs[1]):
        assert torch.equal(ia, ib) and torch.equal(ta["mask"], tb["mask"])
        assert torch.equal(ta["boxes_xyxy"], tb["boxes_xyxy"]) and torch.equal(ta["labels"], tb["labels"])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(outs[0], outs[2]))


def test_randaugment_n_and_m():
    assert (augment.RANDAUGMENT_N, augment.RANDAUGMENT_M) == (2, 10)
    assert len(RANDAUGMENT_OPS) == 16 and set(RANDAUGMENT_OPS) <= set(OPS)
    image, target = painted_sample(1, noise=True)
    for seed in range(5):
        img0, t0 = apply_level(
            image, target, "S4", SIZE, generator=torch.Generator().manual_seed(seed), randaugment_n=0
        )
        img1, t1 = flip_jitter_crop(image, target, SIZE, (0.5, 2.0), torch.Generator().manual_seed(seed))
        assert torch.equal(img0, img1) and torch.equal(t0["boxes_xyxy"], t1["boxes_xyxy"])
    # magnitude 0: every op is the identity except the parameterless ones
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        _, t = apply_level(image, target, "S4", SIZE, generator=g, randaugment_n=3, randaugment_m=0)
        _, t1 = flip_jitter_crop(image, target, SIZE, (0.5, 2.0), torch.Generator().manual_seed(seed))
        assert torch.equal(t["boxes_xyxy"], t1["boxes_xyxy"])


def test_policy_v0_is_the_recipe_table():
    assert POLICY_V0 == (
        (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
        (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
        (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
        (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
    )
    assert augment.SCALE_RANGE["S2"] == (0.8, 1.2)
    assert augment.SCALE_RANGE["S3"] == augment.SCALE_RANGE["S4"] == (0.5, 2.0)


# ---------------------------------------------------------------- magnitudes


def test_magnitude_maps_follow_the_recipe():
    approx = pytest.approx
    assert op_param("Rotate_BBox", 10) == approx(30) and op_param("Rotate_BBox", 5) == approx(15)
    assert op_param("Rotate", 10, 128) == approx(30)  # angles do not scale with size
    assert op_param("ShearX_BBox", 10) == approx(0.3) and op_param("ShearY", 2) == approx(0.06)
    assert op_param("TranslateX_BBox", 10) == approx(250)
    assert op_param("TranslateX_BBox", 4, 640) == approx(100)
    assert op_param("TranslateX_BBox", 4, 128) == approx(20)
    assert op_param("TranslateY", 4, 128) == approx(20)
    assert op_param("TranslateY_Only_BBoxes", 10, 640) == approx(120)
    assert op_param("TranslateY_Only_BBoxes", 6, 640) == approx(72)
    assert op_param("TranslateY_Only_BBoxes", 6, 128) == approx(14.4)
    assert op_param("Cutout", 8, 640) == approx(80) and op_param("Cutout", 10, 640) == approx(100)
    assert op_param("Cutout", 8, 128) == approx(16)
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert op_param(name, 6) == approx(1.18)
        assert op_param(name, 0) == approx(0.1) and op_param(name, 10) == approx(1.9)
    assert op_param("Posterize", 0) == 8 and op_param("Posterize", 10) == 4 and op_param("Posterize", 5) == 6
    assert op_param("Solarize", 0) == approx(256) and op_param("Solarize", 10) == approx(0)
    assert op_param("Solarize", 5) == approx(128)
    assert op_param("SolarizeAdd", 10) == approx(110) and op_param("SolarizeAdd", 5) == approx(55)
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert op_param(name, 10) is None
    with pytest.raises(ValueError, match="Nope"):
        op_param("Nope", 3)


def test_applied_magnitudes():
    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = {"boxes_xyxy": torch.tensor([[50.0, 40, 70, 60]]), "labels": torch.tensor([0])}
    for name, axis in (("TranslateX_BBox", 0), ("TranslateY_BBox", 1), ("TranslateX", 0), ("TranslateY", 1)):
        shifts = set()
        for seed in range(20):
            out_img, out = OPS[name](image, target, 4, torch.Generator().manual_seed(seed))
            d = out["boxes_xyxy"][0] - target["boxes_xyxy"][0]
            assert d[axis] == d[axis + 2] and d[1 - axis] == d[3 - axis] == 0
            shifts.add(int(d[axis]))
            # the pixels moved by the same amount
            dx, dy = (int(d[0]), 0) if axis == 0 else (0, int(d[1]))
            assert torch.equal(out_img[:, 40 + dy : 60 + dy, 50 + dx : 70 + dx], image[:, 40:60, 50:70])
        assert shifts == {20, -20}  # 100 px at 640 -> 20 px at 128, either sign
    # cutout at level 8 on a 640 image: a square of side 2 * 80, fill / ignore
    big = torch.full((3, 640, 640), 10, dtype=torch.uint8)
    t = {
        "mask": torch.zeros(640, 640, dtype=torch.uint8),
        "boxes_xyxy": torch.tensor([[0.0, 0, 640, 640]]),
        "labels": torch.tensor([1]),
    }
    for seed in range(10):
        out_img, out = OPS["Cutout"](big, t, 8, torch.Generator().manual_seed(seed))
        cut = out_img[0] == FILL
        ys, xs = torch.nonzero(cut, as_tuple=True)
        hh, ww = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert hh <= 160 and ww <= 160 and cut.sum() == hh * ww
        if 80 <= ys.min() + 80 <= 560 and 80 <= xs.min() + 80 <= 560 and ys.min() > 0 and xs.min() > 0:
            assert hh == 160 and ww == 160
        assert torch.equal(out["mask"] == IGNORE, cut)
        assert torch.equal(out["boxes_xyxy"], t["boxes_xyxy"])
    # pixel ops
    ramp = torch.arange(256, dtype=torch.uint8).repeat(3, 16, 1)  # [3,16,256]
    same = lambda name, level: OPS[name](ramp, {}, level, None)[0]  # noqa: E731
    assert torch.equal(same("Solarize", 0), ramp) and torch.equal(same("Solarize", 10), 255 - ramp)
    assert torch.equal(same("Posterize", 10), ramp & 0xF0) and torch.equal(same("Posterize", 0), ramp)
    sa = same("SolarizeAdd", 10)
    assert torch.equal(sa[..., 128:], ramp[..., 128:]) and sa[0, 0, 0] == 110 and sa[0, 0, 127] == 237
    assert torch.equal(same("Invert", 3), 255 - ramp)
    for name in ("Brightness", "Contrast", "Color", "Sharpness"):  # factor 1.0 at level 5
        assert torch.equal(same(name, 5), ramp)
    assert same("Brightness", 10)[0, 0, 100] == 190 and same("Brightness", 0)[0, 0, 100] == 10


def test_pixel_ops_leave_the_target_alone():
    image, target = painted_sample(2, noise=True)
    pixel_ops = [n for n in OPS if n not in GEOMETRIC_OPS and n not in ONLY_BBOXES_OPS and n != "Cutout"]
    assert set(pixel_ops) == {
        "Equalize",
        "Sharpness",
        "Color",
        "AutoContrast",
        "Invert",
        "Posterize",
        "Solarize",
        "Contrast",
        "Brightness",
        "SolarizeAdd",
    }
    for name in pixel_ops:
        for level in (0, 5, 10):
            out_img, out = OPS[name](image, target, level, torch.Generator().manual_seed(level))
            assert out_img.shape == image.shape and out_img.dtype == torch.uint8
            assert torch.equal(out["mask"], target["mask"]) and torch.equal(out["boxes_xyxy"], target["boxes_xyxy"])
    assert torch.equal(OPS["Color"](image, target, 5, None)[0], image)  # factor 1.0 is the identity


def test_inputs_are_not_modified():
    image, target = painted_sample(4, noise=True)
    copy_img, copy_t = image.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()}
    for name in OPS:
        kw = {"prob": 1.0} if name in ONLY_BBOXES_OPS else {}
        OPS[name](image, target, 10, torch.Generator().manual_seed(0), **kw)
    assert torch.equal(image, copy_img)
    for k, v in copy_t.items():
        assert torch.equal(target[k], v) if torch.is_tensor(v) else target[k] == v


# ---------------------------------------------------------------- preview command


def test_preview_command_writes_the_grid(tmp_path, capsys):
    from flows.cli import main
    from flows.preview import grid_pixels

    out = tmp_path / "grid.png"
    assert main(["augment", "preview", "--level", "S3", "--n", "5", "--seed", "2", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # 5 samples of 128 px: 2 rows x 3 columns, 2 px padding
        assert im.size == grid_pixels(5, 128) == (3 * 130 + 2, 2 * 130 + 2)
    assert '"grid"' in capsys.readouterr().out
