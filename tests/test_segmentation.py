"""The segmentation family's parts: VOC reader, segmenter, pixel rule, sidecars, mIoU."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import DataConfig, PseudoLabelConfig
from data.augment import apply_level
from data.voc import VOCSegmentation, read_mask
from segmentation import pseudo
from segmentation.evaluate import confusion_matrix, miou
from segmentation.family import SegmentationFamily, probabilities
from segmentation.model import Segmenter
from tests.conftest import tiny_model_config

FAMILY = SegmentationFamily()


# ----------------------------------------------------------------------------- VOC layout


def write_voc(root, masks: dict[str, np.ndarray], split="train", mask_dir="SegmentationClass", palette=True):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        h, w = mask.shape
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        im = Image.fromarray(mask, mode="L")
        if palette:  # VOC's own files are palette PNGs; the pixel values are the classes
            im = im.convert("P")
            im.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
        im.save(root / mask_dir / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in masks))


def random_mask(seed, h, w, num_classes=4):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.1] = 255
    return mask


def test_voc_fixture_reads_back_exactly(tmp_path):
    masks = {"2007_000032": random_mask(0, 37, 53), "2007_000039": random_mask(1, 64, 48)}
    write_voc(tmp_path, masks)
    ds = VOCSegmentation(tmp_path, "train", num_classes=4)
    assert ds.ids == list(masks) and len(ds) == 2
    for i, (name, mask) in enumerate(masks.items()):
        image, target = ds[i]
        assert target["image_id"] == name
        assert image.shape == (3, *mask.shape) and image.dtype == torch.uint8
        assert torch.equal(target["mask"], torch.from_numpy(mask))


def test_sbd_style_split_with_grey_masks_in_its_own_folder(tmp_path):
    masks = {"a": random_mask(2, 20, 30), "b": random_mask(3, 30, 20), "c": random_mask(4, 16, 16)}
    write_voc(tmp_path, masks, split="train_aug", mask_dir="SegmentationClassAug", palette=False)
    ds = VOCSegmentation(tmp_path, "train_aug", masks="SegmentationClassAug", num_classes=4, limit=2)
    assert ds.ids == ["a", "b"]
    assert torch.equal(ds[1][1]["mask"], torch.from_numpy(masks["b"]))


def test_voc_errors_name_the_bad_value(tmp_path):
    write_voc(tmp_path, {"x": np.full((8, 8), 7, np.uint8)})
    with pytest.raises(ValueError, match="value 7"):
        VOCSegmentation(tmp_path, "train", num_classes=4)[0]
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOCSegmentation(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        VOCSegmentation(tmp_path, "train", masks="SegmentationClassAug")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        read_mask(rgb)


def test_world_masks_agree_with_its_boxes(small_world):
    cfg = DataConfig(
        format="voc",
        voc_root=str(small_world.voc_root),
        image_size=128,
        voc_classes=["background", *small_world.class_names],
    )
    ds = FAMILY.labeled_dataset(cfg, "val", None)
    assert FAMILY.num_classes(cfg) == small_world.num_classes + 1
    values = torch.cat([ds[i][1]["mask"].flatten() for i in range(len(ds))]).unique().tolist()
    assert 0 in values and set(values) <= set(range(small_world.num_classes + 1)) | {255}
    assert len(set(values) - {0, 255}) >= 2  # objects of several classes


def test_s1_on_a_mask_only_target_resamples_nearest_and_pads_with_ignore():
    mask = torch.from_numpy(random_mask(5, 96, 64, num_classes=3))
    image = torch.zeros(3, 96, 64, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        _, out = apply_level(image, {"mask": mask}, "S1", 128, generator=g)
        assert out["mask"].shape == (128, 128)
        assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 255}
        assert (out["mask"][:, 100:] == 255).all()  # 64 px wide * at most 1.2 < 100: padding


# ----------------------------------------------------------------------------- model


def test_segmenter_logits_match_the_input_and_loss_ignores_255():
    model = FAMILY.build_model(tiny_model_config(num_classes=5, neck="nasfpn", nasfpn_repeats=1))
    assert isinstance(model, Segmenter)
    images = torch.randint(0, 255, (2, 3, 128, 256), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (2, 5, 128, 256)
    masks = torch.randint(0, 5, (2, 128, 256), dtype=torch.uint8)
    masks[1] = 255
    masks[0, :64] = 255
    loss = Segmenter.loss(logits, masks)
    want = F.cross_entropy(logits[:1], masks[:1].long(), ignore_index=255)
    # the batch's mean is the mean over its labeled pixels, all of them in image 0
    assert torch.allclose(loss.mean(), want) and loss[1] == 0
    with pytest.raises(ValueError, match="multiple of 128"):
        model(torch.zeros(1, 3, 100, 128))


def _pixel_loss_case(seed=0):
    """Logits [2,3,128,128] and masks: image 0 labels 10 pixels, image 1 10,000."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 128, 128, generator=g)
    masks = torch.randint(0, 3, (2, 128, 128), dtype=torch.uint8, generator=g)
    masks[0].view(-1)[10:] = 255
    masks[1].view(-1)[10_000:] = 255
    return logits, masks


def test_segmentation_loss_of_a_group_is_its_mean_over_labeled_pixels():
    logits, masks = _pixel_loss_case()
    assert [(m != 255).sum().item() for m in masks] == [10, 10_000]
    loss = Segmenter.loss(logits, masks, group_sizes=(2,))
    want = F.cross_entropy(logits, masks.long(), ignore_index=255, reduction="sum") / 10_010
    assert torch.allclose(loss.mean(), want, rtol=1e-5)
    assert torch.allclose(Segmenter.loss(logits, masks).mean(), want, rtol=1e-5)  # one group by default
    # not the mean of the two images' own means, which weighs 10 pixels like 10,000
    per_image = [F.cross_entropy(logits[i : i + 1], masks[i : i + 1].long(), ignore_index=255) for i in range(2)]
    assert not torch.isclose(loss.mean(), torch.stack(per_image).mean(), rtol=1e-3)
    # groups of one image each: each image's own mean
    alone = Segmenter.loss(logits, masks, group_sizes=(1, 1))
    assert torch.allclose(alone, torch.stack(per_image), rtol=1e-5)
    with pytest.raises(ValueError, match="do not split"):
        Segmenter.loss(logits, masks, group_sizes=(1, 2))


def test_segmentation_group_without_labeled_pixels_gives_zero_and_gradients_flow():
    logits, masks = _pixel_loss_case(1)
    masks[1] = 255  # the pseudo part: a crop the teacher left unlabeled
    logits.requires_grad_(True)
    loss = Segmenter.loss(logits, masks, group_sizes=(1, 1))
    assert torch.isfinite(loss).all() and loss[1] == 0
    want = F.cross_entropy(logits[:1], masks[:1].long(), ignore_index=255)
    assert torch.allclose(loss[0], want, rtol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0
    empty = Segmenter.loss(logits, torch.full_like(masks, 255))
    assert (empty == 0).all() and not empty.isnan().any()


def test_segmentation_family_normalizes_human_and_pseudo_parts_separately():
    model = FAMILY.build_model(tiny_model_config(num_classes=3, neck="fpn")).eval()
    _, masks = _pixel_loss_case(2)
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(images)
        split = FAMILY.losses(model, {"images": images, "masks": masks, "num_human": 1})["loss_seg"]
        whole = FAMILY.losses(model, {"images": images, "masks": masks})["loss_seg"]
    assert torch.allclose(split, Segmenter.loss(logits, masks, group_sizes=(1, 1)), rtol=1e-5)
    assert torch.allclose(whole, Segmenter.loss(logits, masks), rtol=1e-5)
    assert not torch.allclose(split, whole, rtol=1e-3)


def _distributed_pixel_counts(masks, *, device, log, on_step):
    """Rank r of two holds image r of the batch; every rank's loss share (to rank 0)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 128, 128)
    share = Segmenter.loss(logits[rank : rank + 1], masks[rank : rank + 1])
    gathered = [None, None]
    dist.all_gather_object(gathered, share)
    return torch.cat(gathered)


def test_segmentation_loss_counts_labeled_pixels_over_ranks():
    from engine import launcher

    _, masks = _pixel_loss_case()
    shares = launcher.launch(_distributed_pixel_counts, (masks,), processes=2, device="cpu")
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 128, 128)
    # DDP averages the ranks' gradients: the mean of the ranks' losses is the one-process loss
    assert torch.allclose(shares, Segmenter.loss(logits, masks), rtol=1e-5)


def test_multi_scale_probabilities_are_an_average_in_the_image_frame():
    torch.manual_seed(0)
    model = FAMILY.build_model(tiny_model_config(num_classes=4)).eval()
    images = [
        torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8),
        torch.randint(0, 255, (3, 64, 40), dtype=torch.uint8),
    ]
    one = probabilities(model, images, 128, (1.0,))
    twice = probabilities(model, images, 128, (1.0, 1.0))
    multi = probabilities(model, images, 128, (0.5, 1.0, 1.75))
    half = probabilities(model, images, 128, (0.5,))
    big = probabilities(model, images, 128, (1.75,))
    for im, p, p2, pm, ph, pb in zip(images, one, twice, multi, half, big):
        assert p.shape == (4, *im.shape[-2:])
        assert torch.allclose(p.sum(0), torch.ones(im.shape[-2:]), atol=1e-5)
        assert torch.allclose(p, p2, atol=1e-6)
        assert torch.allclose(pm, (ph + p + pb) / 3, atol=1e-6)


# ----------------------------------------------------------------------------- pixel rule


def test_pixel_rule_at_the_threshold_edge():
    score = torch.tensor([[0.5, 0.49999], [0.9, 0.2]])
    cls = torch.tensor([[3, 1], [0, 2]], dtype=torch.uint8)
    label = pseudo.select_pixels({"mask": cls, "score": score}, 0.5)
    assert label["mask"].tolist() == [[3, 255], [0, 255]]
    assert pseudo.select_pixels({"mask": cls, "score": score}, 0.95) is None
    rule = PseudoLabelConfig(score_threshold=0.9)
    assert FAMILY.to_pseudo_label({"mask": cls, "score": score}, rule)["mask"].tolist() == [[255, 255], [0, 255]]


def test_png_sidecar_is_lossless_and_stats_add_up():
    mask = torch.from_numpy(random_mask(6, 33, 47, num_classes=21))
    data = pseudo.encode({"mask": mask})
    assert Image.open(io.BytesIO(data)).format == "PNG"
    assert torch.equal(pseudo.decode(data)["mask"], mask)
    s = pseudo.stats({"mask": mask}, 21)
    kept = int((mask != 255).sum())
    assert s["labels"] == kept and s["pixels"] == 33 * 47 and sum(s["class_counts"]) == kept
    assert s["class_counts"][4] == int((mask == 4).sum())
    assert sum(s["kept_share_hist"]) == 1 and s["kept_share_hist"][int(10 * kept / (33 * 47))] == 1
    with pytest.raises(ValueError, match="uint8"):
        pseudo.encode({"mask": mask.long()})


# ----------------------------------------------------------------------------- mIoU


def test_miou_matches_a_hand_computed_example():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 255]], dtype=torch.uint8)
    pr = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0], [2, 2, 0, 1]], dtype=torch.uint8)
    conf = confusion_matrix(pr, gt, 4)
    # class 0: TP 3, FP 1 (gt 2 -> 0), FN 1 (gt 0 -> 1): IoU 3/5
    # class 1: TP 2, FP 1, FN 1 (gt 1 -> 2): IoU 2/4
    # class 2: TP 2, FP 1 (gt 1 -> 2), FN 1: IoU 2/4; class 3 absent everywhere: no IoU
    assert conf.sum() == 10 and conf[0, 0] == 3 and conf[1, 2] == 1 and conf[2, 0] == 1
    m = miou(conf, ["bg", "a", "b", "c"])
    assert m["mIoU"] == pytest.approx(100 * (3 / 5 + 2 / 4 + 2 / 4) / 3)
    assert m["IoU/bg"] == pytest.approx(60.0) and "IoU/c" not in m
    assert m["pixel_accuracy"] == pytest.approx(70.0)
    # a predicted class with no ground truth counts, with IoU 0
    conf[0, 3] += 5
    assert miou(conf)["mIoU"] == pytest.approx(100 * (3 / 10 + 2 / 4 + 2 / 4 + 0) / 4)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.full((2, 2), 9, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8), 4)


def test_perfect_prediction_scores_100():
    gt = torch.from_numpy(random_mask(7, 20, 20))
    pred = torch.where(gt == 255, torch.tensor(0, dtype=torch.uint8), gt)
    assert miou(confusion_matrix(pred, gt, 4))["mIoU"] == pytest.approx(100.0)
