"""data/world.py: determinism, box/mask consistency, COCO / VOC / shard outputs, caching."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from data.shards import expand_urls, iter_shard
from data.world import IGNORE, WorldSpec, render_scene, voc_palette, write_world

SMALL = dict(n_train=6, n_val=4, n_unlabeled=10, per_shard=4)


def _scenes_equal(a, b) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and np.array_equal(a.mask, b.mask)
        and np.array_equal(a.boxes_xyxy, b.boxes_xyxy)
        and np.array_equal(a.labels, b.labels)
    )


def test_scene_contract():
    spec = WorldSpec()
    for i in range(20):
        s = render_scene(spec, 0, i, "train")
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (128, 128) and s.mask.dtype == np.uint8
        assert s.boxes_xyxy.dtype == np.float32 and s.boxes_xyxy.shape == (len(s.labels), 4)
        assert s.labels.dtype == np.int64 and ((s.labels >= 0) & (s.labels < 3)).all()
        assert set(np.unique(s.mask).tolist()) <= {0, 1, 2, 3, IGNORE}
        b = s.boxes_xyxy
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert (b >= 0).all() and (b <= 128).all()
        for box, label in zip(b.astype(int), s.labels):
            x0, y0, x1, y1 = box
            # every box holds pixels of its class on each of its four edges' lines
            inside = s.mask[y0:y1, x0:x1] == label + 1
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_render_is_deterministic_and_seeded():
    spec = WorldSpec()
    a = render_scene(spec, 3, 5, "train")
    # Rendering other scenes first does not change scene 5.
    for i in range(5):
        render_scene(spec, 3, i, "train")
    assert _scenes_equal(a, render_scene(spec, 3, 5, "train"))
    assert not np.array_equal(a.image, render_scene(spec, 4, 5, "train").image)
    assert not np.array_equal(a.image, render_scene(spec, 3, 5, "val").image)
    assert not np.array_equal(a.image, render_scene(spec, 3, 6, "train").image)


def test_box_is_tight_box_of_single_unoccluded_object():
    spec = WorldSpec(objects_per_image=(1, 1), distractors_per_image=(0, 0))
    for i in range(15):
        s = render_scene(spec, 1, i, "train")
        assert len(s.labels) == 1
        ys, xs = np.nonzero(s.mask == s.labels[0] + 1)
        assert ys.size > 0
        # pixel-edge convention: x1 = last column + 1
        expected = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_array_equal(s.boxes_xyxy[0], expected)
        assert set(np.unique(s.mask).tolist()) == {0, int(s.labels[0]) + 1}


def test_heavily_occluded_objects_are_dropped_and_ignored():
    spec = WorldSpec(objects_per_image=(4, 4), object_size=(40, 60), min_visible=0.9)
    dropped = 0
    for i in range(20):
        s = render_scene(spec, 0, i, "train")
        n_ignore = int((s.mask == IGNORE).sum())
        dropped += len(s.labels) < 4
        if len(s.labels) == 4:
            assert n_ignore == 0
    assert dropped > 0
    # With min_visible=0 nothing visible is dropped, so no ignore pixels appear.
    lax = dataclasses.replace(spec, min_visible=0.0)
    assert all((render_scene(lax, 0, i, "train").mask != IGNORE).all() for i in range(20))


def test_spec_validation():
    with pytest.raises(ValueError, match="both classes and distractors"):
        WorldSpec(class_names=("circle", "ring"))
    with pytest.raises(ValueError, match="class_names"):
        WorldSpec(class_names=("circle", "blob"))
    with pytest.raises(ValueError, match="objects_per_image"):
        WorldSpec(objects_per_image=(3, 1))
    spec = WorldSpec(class_names=("circle", "square", "triangle", "hexagon"), noise_std=5.0)
    assert WorldSpec.from_dict(spec.to_dict()) == spec


def _load_coco(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_write_world_layouts(tmp_path):
    paths = write_world(tmp_path / "w", seed=2, **SMALL)
    root = paths.root
    assert paths.num_classes == 3 and paths.class_names == ("circle", "square", "triangle")

    # COCO
    for split, ann, n in (("train", paths.train_annotations, 6), ("val", paths.val_annotations, 4)):
        coco = _load_coco(ann)
        assert len(coco.getImgIds()) == n
        assert sorted(coco.getCatIds()) == [1, 2, 3]
        assert [c["name"] for c in coco.loadCats([1, 2, 3])] == ["circle", "square", "triangle"]
        expected_boxes = 0
        for img in coco.loadImgs(coco.getImgIds()):
            index = int(img["file_name"].split("_")[1].split(".")[0])
            assert img["file_name"] == f"{split}_{index:06d}.jpg" and (paths.images_dir / img["file_name"]).exists()
            assert (img["width"], img["height"]) == (128, 128)
            scene = render_scene(WorldSpec(), 2, index, split)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            expected_boxes += len(scene.labels)
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            np.testing.assert_allclose(np.array(xyxy).reshape(-1, 4), scene.boxes_xyxy)
            assert [a["category_id"] for a in anns] == (scene.labels + 1).tolist()
            assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)
        assert len(coco.getAnnIds()) == expected_boxes > 0

    # VOC
    for split, n in (("train", 6), ("val", 4)):
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert ids == [f"{split}_{i:06d}" for i in range(n)]
    png = Image.open(root / "SegmentationClass" / "val_000003.png")
    assert png.mode == "P"
    assert png.getpalette()[: 3 * 4] == voc_palette()[: 3 * 4] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert voc_palette()[3 * 255 : 3 * 256] == [224, 224, 192]
    np.testing.assert_array_equal(np.array(png), render_scene(WorldSpec(), 2, 3, "val").mask)

    # unlabeled pool
    shards = expand_urls(paths.unlabeled_pattern)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    keys = [k for s in shards for k, rec in iter_shard(s)]
    assert keys == [f"u_{i:06d}" for i in range(10)]

    meta = json.loads((root / "world.json").read_text())
    assert meta["seed"] == 2 and meta["counts"] == {"train": 6, "val": 4, "unlabeled": 10}
    assert meta["unlabeled_pattern"] == "unlabeled/pool-{000000..000002}.tar"
    assert WorldSpec.from_dict(meta["spec"]) == WorldSpec()


def test_webdataset_reads_the_pool(tmp_path):
    import webdataset as wds

    paths = write_world(tmp_path / "w", **SMALL)
    ds = wds.WebDataset(expand_urls(paths.unlabeled_pattern), shardshuffle=False).decode("rgb8")
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"u_{i:06d}" for i in range(10)]
    assert samples[0]["jpg"].shape == (128, 128, 3)


def test_write_world_is_deterministic(tmp_path):
    a = write_world(tmp_path / "a", seed=0, **SMALL)
    b = write_world(tmp_path / "b", seed=0, **SMALL)
    c = write_world(tmp_path / "c", seed=1, **SMALL)
    for rel in ("JPEGImages/train_000004.jpg", "SegmentationClass/val_000001.png", "unlabeled/pool-000001.tar"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    assert a.train_annotations.read_text() == b.train_annotations.read_text()
    jpg = "JPEGImages/train_000004.jpg"
    assert (a.root / jpg).read_bytes() != (c.root / jpg).read_bytes()
    assert a.train_annotations.read_text() != c.train_annotations.read_text()


def test_write_world_is_idempotent_and_regenerates_on_change(tmp_path):
    out = tmp_path / "w"
    paths = write_world(out, **SMALL)
    watched = [out / "world.json", paths.train_annotations, out / "JPEGImages/train_000000.jpg",
               out / "unlabeled/pool-000000.tar"]  # fmt: skip
    mtimes = [p.stat().st_mtime_ns for p in watched]
    again = write_world(out, **SMALL)
    assert again == paths
    assert [p.stat().st_mtime_ns for p in watched] == mtimes

    # Different counts: regenerated, and stale files of the larger world are gone.
    smaller = write_world(out, n_train=3, n_val=2, n_unlabeled=4, per_shard=4)
    assert json.loads((out / "world.json").read_text())["counts"] == {"train": 3, "val": 2, "unlabeled": 4}
    assert sorted(p.name for p in (out / "JPEGImages").iterdir())[-1] == "val_000001.jpg"
    assert len(list((out / "JPEGImages").iterdir())) == 5
    assert [p.name for p in (out / "unlabeled").iterdir()] == ["pool-000000.tar"]
    assert smaller.unlabeled_pattern.endswith("unlabeled/pool-000000.tar")

    # A different spec regenerates too.
    before = (out / "JPEGImages/train_000000.jpg").read_bytes()
    write_world(out, WorldSpec(noise_std=30.0), n_train=3, n_val=2, n_unlabeled=4, per_shard=4)
    assert (out / "JPEGImages/train_000000.jpg").read_bytes() != before


@pytest.mark.parametrize("family", ["detection", "segmentation"])
def test_demo_worlds_are_deterministic_per_seed(family):
    from engine.families import FAMILIES

    spec = FAMILIES[family].demo.world
    for i in range(3):
        assert _scenes_equal(render_scene(spec, 3, i, "train"), render_scene(spec, 3, i, "train"))
        assert not np.array_equal(render_scene(spec, 3, i, "train").image, render_scene(spec, 4, i, "train").image)


@pytest.mark.parametrize("family", ["detection", "segmentation"])
def test_demo_worlds_keep_the_sizes_they_promise(family):
    """Boxes within the spec's object sizes, upright squares, 1-4 objects, distractors kept."""
    from engine.families import FAMILIES

    spec = FAMILIES[family].demo.world
    lo, hi = spec.object_size
    assert not spec.rotate and spec.distractors_per_image[1] >= 1 and spec.objects_per_image == (1, 4)
    assert spec.distractors_per_image == (0, 1)
    if family == "detection":  # calmer textures than the renderer's defaults
        assert spec.noise_std <= 8 and spec.min_contrast >= 60
    else:  # shapes large enough to tell apart at stride 8
        assert lo >= 32
    longest, counts, square_fill = [], [], []
    for i in range(80):
        s = render_scene(spec, 0, i, "train")
        assert s.image.shape == (spec.image_size, spec.image_size, 3)
        counts.append(len(s.labels))
        for box, label, area in zip(s.boxes_xyxy, s.labels, s.areas):
            w, h = box[2] - box[0], box[3] - box[1]
            assert max(w, h) <= hi + 1
            longest.append(max(w, h))
            if spec.class_names[label] == "square":
                square_fill.append(area / (w * h))
    # occlusion drops an object now and then (min_visible), rarely a whole scene's
    assert max(counts) <= 4 and np.mean(counts) > 1.5 and np.mean(np.array(counts) == 0) < 0.05
    assert max(longest) >= 0.85 * hi and np.percentile(longest, 5) < lo + 0.25 * (hi - lo)
    # Upright squares fill their box unless occluded: most of them do.
    assert np.median(square_fill) > 0.95


def test_the_holdout_split_adds_scenes_of_its_own(tmp_path):
    plain = write_world(tmp_path / "plain", **SMALL)
    held = write_world(tmp_path / "held", **SMALL, n_holdout=3)
    coco = json.loads(held.holdout_annotations.read_text())
    assert [im["file_name"] for im in coco["images"]] == [f"holdout_{i:06d}.jpg" for i in range(3)]
    assert (held.root / "ImageSets/Segmentation/holdout.txt").read_text().split() == [
        f"holdout_{i:06d}" for i in range(3)
    ]
    assert (held.root / "SegmentationClass/holdout_000002.png").exists()
    # the other splits do not change, and holdout scenes are none of theirs
    for rel in ("JPEGImages/train_000004.jpg", "JPEGImages/val_000001.jpg", "unlabeled/pool-000001.tar"):
        assert (plain.root / rel).read_bytes() == (held.root / rel).read_bytes()
    train = {(plain.root / f"JPEGImages/train_{i:06d}.jpg").read_bytes() for i in range(6)}
    assert not train & {(held.root / f"JPEGImages/holdout_{i:06d}.jpg").read_bytes() for i in range(3)}
    # a world without one keeps its identity (cached worlds stay valid), and has no holdout file
    assert "holdout" not in json.loads((plain.root / "world.json").read_text())["counts"]
    assert not plain.holdout_annotations.exists()
    # the demo's data section names the split only when the world has it
    from detection.family import DEMO

    assert "holdout_annotations" in DEMO.data(held)[0] and "holdout_annotations" not in DEMO.data(plain)[0]
