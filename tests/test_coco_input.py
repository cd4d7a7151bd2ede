"""A broken or mismatched COCO json fails with the file and the reason; bad boxes are dropped and counted."""

import json

import pytest
from PIL import Image

from data.coco import CocoDetection, CocoFormatError, load_coco


def write(tmp_path, images=None, annotations=None, categories=None, files=("1.jpg", "2.jpg")):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for name in files:
        Image.new("RGB", (100, 80), (120, 30, 200)).save(folder / name)
    dataset = {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "1.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "2.jpg", "width": 100, "height": 80},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30], "iscrowd": 0},
        ],
        "categories": categories if categories is not None else [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return folder, path


def ann(i, bbox, category=3, image=1):
    return {"id": i, "image_id": image, "category_id": category, "bbox": bbox, "iscrowd": 0}


def test_a_good_json_reads(tmp_path):
    ds = CocoDetection(*write(tmp_path))
    assert len(ds) == 2 and ds.class_names == ["a", "b"] and ds.dropped == {"zero_area": 0, "outside_image": 0}
    assert ds.target(0)["boxes_xyxy"].tolist() == [[10, 10, 30, 40]]


def test_broken_json_names_the_file(tmp_path):
    _, path = write(tmp_path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(CocoFormatError, match=rf"{path}: not valid JSON"):
        load_coco(path)


def test_a_missing_top_level_list_is_named(tmp_path):
    _, path = write(tmp_path)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CocoFormatError, match=rf"{path}: no list 'categories'"):
        load_coco(path)


def test_unknown_category_id_names_the_annotation_and_the_id(tmp_path):
    _, path = write(tmp_path, annotations=[ann(1, [1, 1, 5, 5]), ann(2, [1, 1, 5, 5], category=12)])
    with pytest.raises(CocoFormatError) as err:
        load_coco(path)
    msg = str(err.value)
    assert str(path) in msg and "annotation id 2" in msg and "category_id 12" in msg and "ids: 3, 7" in msg


def test_unknown_image_id_is_named(tmp_path):
    _, path = write(tmp_path, annotations=[ann(5, [1, 1, 5, 5], image=99)])
    with pytest.raises(CocoFormatError, match=rf"{path}: annotation id 5 has image_id 99"):
        load_coco(path)


@pytest.mark.parametrize("bbox", [["1", 2, 3, 4], [1, 2, 3], [1, None, 3, 4], [1, 2, float("nan"), 4], "1,2,3,4"])
def test_bbox_values_that_are_not_numbers_are_named(tmp_path, bbox):
    _, path = write(tmp_path, annotations=[ann(4, bbox)])
    with pytest.raises(CocoFormatError) as err:
        load_coco(path)
    msg = str(err.value)
    assert str(path) in msg and "annotation id 4" in msg and f"bbox {bbox!r}" in msg


def test_missing_image_files_are_named(tmp_path):
    folder, path = write(tmp_path, files=("1.jpg",))
    with pytest.raises(CocoFormatError) as err:
        CocoDetection(folder, path)
    msg = str(err.value)
    assert str(path) in msg and "1 image file(s)" in msg and "2.jpg" in msg and str(folder) in msg
    assert len(CocoDetection(folder, path, limit=1)) == 1  # a label fraction needs only its own images


def test_zero_area_and_outside_boxes_are_dropped_and_counted(tmp_path):
    anns = [
        ann(1, [10, 10, 20, 30]),  # kept
        ann(2, [10, 10, 0, 30]),  # zero width
        ann(3, [10, 10, 20, -1]),  # negative height
        ann(4, [150, 10, 20, 20]),  # right of the 100 px wide image
        ann(5, [-40, -40, 30, 30]),  # above and left of it
        ann(6, [90, 70, 30, 30], image=2),  # partly outside: clipped
    ]
    folder, path = write(tmp_path, annotations=anns)
    with pytest.warns(UserWarning, match=r"dropped 2 annotation\(s\) with a zero-area box and 2 with a box outside"):
        ds = CocoDetection(folder, path)
    assert ds.dropped == {"zero_area": 2, "outside_image": 2}
    assert ds.target(0)["boxes_xyxy"].tolist() == [[10, 10, 30, 40]] and ds.target(0)["labels"].tolist() == [0]
    assert ds.target(1)["boxes_xyxy"].tolist() == [[90, 70, 100, 80]]
