"""Detection on PASCAL VOC's layout: Annotations/*.xml and ImageSets/Main lists, one folder or several."""

import json
import os
from pathlib import Path

import pytest
import torch

from configs import ConfigError, DataConfig, RunConfig
from data.voc_boxes import VocFormatError, read_annotation, split_ids, voc_coco, voc_detection
from engine.families import FAMILIES, check_config
from engine.inputs import missing_inputs
from tests.conftest import tiny_model_config

XML = """<annotation>
  <filename>{ident}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
OBJECT = """  <object><name>{name}</name><truncated>{truncated}</truncated><difficult>{difficult}</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
"""


def write_voc(root: Path, splits: dict[str, list[str]], boxes: dict[str, list[dict]], size=(128, 128), jpeg=None):
    """A VOC detection folder: one XML per id (boxes: name, 1-based corners, difficult)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for ident, objs in boxes.items():
        body = "".join(
            OBJECT.format(
                name=o["name"], truncated=int(o.get("truncated", 0)), difficult=int(o.get("difficult", 0)), **o["box"]
            )
            for o in objs
        )
        (root / "Annotations" / f"{ident}.xml").write_text(XML.format(ident=ident, w=size[0], h=size[1], objects=body))
        if jpeg is not None:
            (root / "JPEGImages" / f"{ident}.jpg").write_bytes(jpeg)


def jpeg_bytes(size=(128, 128)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


def voc_from_world(world, root: Path) -> Path:
    """The world's COCO splits rewritten in VOC's detection layout (the same images and boxes)."""
    for sub in ("Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").symlink_to(world.images_dir)
    for split, path in (("train", world.train_annotations), ("val", world.val_annotations)):
        coco = json.loads(Path(path).read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        ids = []
        for im in coco["images"]:
            ident = Path(im["file_name"]).stem
            ids.append(ident)
            objs = [
                {
                    "name": names[a["category_id"]],
                    "box": dict(
                        x0=a["bbox"][0] + 1,
                        y0=a["bbox"][1] + 1,
                        x1=a["bbox"][0] + a["bbox"][2],
                        y1=a["bbox"][1] + a["bbox"][3],
                    ),
                }
                for a in coco["annotations"]
                if a["image_id"] == im["id"]
            ]
            body = "".join(OBJECT.format(name=o["name"], truncated=0, difficult=0, **o["box"]) for o in objs)
            xml = XML.format(ident=ident, w=im["width"], h=im["height"], objects=body)
            (root / "Annotations" / f"{ident}.xml").write_text(xml)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def voc_data(root, classes, **kw) -> DataConfig:
    return DataConfig(format="voc", voc_root=str(root), voc_classes=classes, image_size=128, num_workers=0, **kw)


def world_classes(world) -> list[str]:
    return [c["name"] for c in json.loads(Path(world.val_annotations).read_text())["categories"]]


def test_the_world_in_voc_layout_gives_the_same_boxes_as_its_coco_json(small_world, tmp_path):
    root = voc_from_world(small_world, tmp_path / "VOC2012")
    family = FAMILIES["detection"]
    voc = family.labeled_dataset(voc_data(root, world_classes(small_world)), "val", None)
    coco = family.labeled_dataset(
        DataConfig(
            train_images=str(small_world.images_dir),
            train_annotations=str(small_world.train_annotations),
            val_images=str(small_world.images_dir),
            val_annotations=str(small_world.val_annotations),
            image_size=128,
        ),
        "val",
        None,
    )
    assert len(voc) == len(coco) and voc.class_names == coco.class_names
    for i in range(len(voc)):
        a, b = voc.target(i), coco.target(i)
        assert torch.allclose(a["boxes_xyxy"], b["boxes_xyxy"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(voc.image(i), coco.image(i))


def test_difficult_objects_are_left_out_of_training_and_ignored_in_evaluation(tmp_path):
    boxes = {
        "a": [
            {"name": "dog", "box": dict(x0=11, y0=21, x1=50, y1=60)},
            {"name": "cat", "box": dict(x0=1, y0=1, x1=10, y1=10), "difficult": 1},
            {"name": "dog", "box": dict(x0=100, y0=100, x1=200, y1=200), "truncated": 1},  # clipped to 128
        ]
    }
    write_voc(tmp_path, {"val": ["a"]}, boxes, jpeg=jpeg_bytes())
    (read,) = [read_annotation(tmp_path / "Annotations" / "a.xml")]
    assert [o["difficult"] for o in read["objects"]] == [False, True, False]
    dataset, base = voc_coco(split_ids([str(tmp_path)], "val"), ["cat", "dog"])
    anns = dataset["annotations"]
    assert anns[0]["bbox"] == [10.0, 20.0, 40.0, 40.0] and anns[0]["category_id"] == 2  # 1-based corners in
    assert [a["iscrowd"] for a in anns] == [0, 1, 0]
    assert dataset["images"][0]["file_name"] == os.path.join("JPEGImages", "a.jpg") and base == str(tmp_path)
    from data.coco import CocoDetection, coco_of

    ds = CocoDetection(base, coco_of(dataset, "voc"), None, 128)
    target = ds.target(0)
    assert target["labels"].tolist() == [1, 1]  # the difficult cat is not trained on
    assert target["boxes_xyxy"][1].tolist() == [99.0, 99.0, 128.0, 128.0]
    # pycocotools ignores the difficult box: a detection on it is neither true nor false
    from detection import evaluate as coco_eval

    hit = [{"image_id": 1, "category_id": 2, "bbox": a["bbox"], "score": 0.9} for a in (anns[0], anns[2])]
    on_difficult = [{"image_id": 1, "category_id": 1, "bbox": anns[1]["bbox"], "score": 0.8}]
    assert coco_eval.coco_ap(ds.coco, hit, ds.ids)["AP50"] == pytest.approx(100.0)
    assert coco_eval.coco_ap(ds.coco, hit + on_difficult, ds.ids)["AP50"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "xml, reason",
    [
        ("<annotation><size><width>4</width>", "not valid XML"),
        ("<annotation><object><name>dog</name></object></annotation>", "no <size>"),
        (
            XML.format(ident="a", w=9, h=9, objects="<object><name>dog</name></object>"),
            "object 0 (dog) has no <bndbox>",
        ),
        (
            XML.format(
                ident="a",
                w=9,
                h=9,
                objects=OBJECT.format(name="dog", truncated=0, difficult=0, x0="1,5", y0=1, x1=3, y1=3),
            ),
            "<xmin> is '1,5', not a number",
        ),
        (XML.format(ident="a", w="wide", h=9, objects=""), "<size> <width> is 'wide'"),
    ],
)
def test_a_broken_annotation_names_its_file_and_reason(tmp_path, xml, reason):
    path = tmp_path / "a.xml"
    path.write_text(xml)
    with pytest.raises(VocFormatError) as err:
        read_annotation(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_a_missing_file_or_an_unknown_class_is_named(tmp_path):
    write_voc(tmp_path, {"val": ["a", "b"]}, {"a": [{"name": "zebra", "box": dict(x0=1, y0=1, x1=5, y1=5)}]})
    with pytest.raises(VocFormatError, match="zebra.*not one of cat, dog"):
        voc_coco(split_ids([str(tmp_path)], "val"), ["cat", "dog"])
    (tmp_path / "Annotations" / "a.xml").unlink()
    with pytest.raises(VocFormatError, match=r"a\.xml: no such annotation file"):
        voc_coco(split_ids([str(tmp_path)], "val"), ["cat", "dog"])


def test_several_folders_combine_and_a_split_can_name_its_folder(tmp_path):
    one = {"a": [{"name": "dog", "box": dict(x0=1, y0=1, x1=5, y1=5)}]}
    write_voc(tmp_path / "VOC2007", {"trainval": ["a"], "test": ["a"]}, one)
    write_voc(tmp_path / "VOC2012", {"trainval": ["a"]}, one)
    roots = [str(tmp_path / "VOC2007"), str(tmp_path / "VOC2012")]
    assert [Path(r).name for r, _ in split_ids(roots, "trainval")] == ["VOC2007", "VOC2012"]
    assert [Path(r).name for r, _ in split_ids(roots, "VOC2007/test")] == ["VOC2007"]
    dataset, base = voc_coco(split_ids(roots, "VOC2007/trainval+VOC2012/trainval"), ["dog"])
    assert [im["file_name"] for im in dataset["images"]] == [
        os.path.join("VOC2007", "JPEGImages", "a.jpg"),
        os.path.join("VOC2012", "JPEGImages", "a.jpg"),
    ]
    assert base == str(tmp_path)
    cfg = RunConfig(
        family="detection",
        data=DataConfig(format="voc", voc_root=roots, voc_train_split="trainval", voc_val_split="VOC2008/test"),
    )
    with pytest.raises(ConfigError, match="voc_val_split='VOC2008/test' names the folder 'VOC2008'"):
        check_config(cfg)
    ok = cfg.model_copy(update={"data": cfg.data.model_copy(update={"voc_val_split": "VOC2007/test"})})
    check_config(ok)
    # a folder the split reads is named by the input check, with its key
    (tmp_path / "VOC2012" / "JPEGImages").rmdir()
    missing = missing_inputs(ok, ["teacher"])
    assert missing == [("data.voc_root", str(tmp_path / "VOC2012" / "JPEGImages"), "no such folder")]


def test_segmentation_reads_one_voc_folder(tmp_path):
    cfg = RunConfig(family="segmentation", data=DataConfig(format="voc", voc_root=[str(tmp_path), str(tmp_path)]))
    with pytest.raises(ConfigError, match="segmentation reads one VOC folder"):
        check_config(cfg)


def test_voc_detection_trains_and_evaluates_a_tiny_model(small_world, tmp_path):
    root = voc_from_world(small_world, tmp_path / "VOC2012")
    family = FAMILIES["detection"]
    data = voc_data(root, world_classes(small_world), voc_train_split="train")
    ds = voc_detection(data, "train", "S1", 128)
    batch = family.collate([ds[i] for i in range(2)])
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(data)))
    assert all(v.shape == (2,) for v in family.losses(model, batch).values())
    metrics = family.evaluate(model, data, batch_size=4)
    assert {"AP", "AP50"} <= set(metrics)


@pytest.mark.slow
def test_a_voc_detection_run_goes_through_teacher_pseudo_labels_and_student(prefect_harness, small_world, tmp_path):
    from configs import PseudoLabelConfig, StudentConfig, TrainConfig
    from flows import stages

    root = voc_from_world(small_world, tmp_path / "VOC2012")
    data = voc_data(root, world_classes(small_world), voc_train_split="train")
    data = data.model_copy(update={"unlabeled_shards": small_world.unlabeled_pattern})
    train = TrainConfig(steps=4, batch_size=4, warmup_steps=0, augment_level="S1", checkpoint_every=2, log_every=2)
    cfg = RunConfig(
        family="detection",
        out_dir=str(tmp_path / "run"),
        data=data,
        model=tiny_model_config(num_classes=len(world_classes(small_world))),
        teacher=train,
        pseudo=PseudoLabelConfig(score_threshold=0.0, batch_size=8),  # a 4-step teacher: keep what it finds
        student=StudentConfig(train=train),
        eval_batch_size=8,
    )
    teacher = stages.teacher_flow(cfg)
    pseudo = stages.pseudo_label_flow(cfg, 0)
    student = stages.student_flow(cfg, 0)
    assert teacher["metric"] == "AP" and {"AP", "AP50"} <= set(teacher["metrics"])
    assert pseudo["stats"]["images"] == 16
    assert {"AP", "AP50"} <= set(student["metrics"])
    detections = tmp_path / "run" / "round-0" / "student" / "predictions" / "detections.json"
    assert isinstance(json.loads(detections.read_text()), list)
