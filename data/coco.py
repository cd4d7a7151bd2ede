"""COCO-format detection data read through pycocotools.

Category ids (any, possibly sparse, as in COCO's 1..90) are mapped to contiguous
labels 0..K-1 in sorted id order, and back with `category_id(label)`. Crowd
annotations (`iscrowd=1`) are ignored.

A json that is broken or does not fit its image folder fails when it is read, with a
`CocoFormatError` naming the file and the reason: not JSON, a missing top-level list,
an annotation whose image or category id the json does not list, a bbox that is not
four numbers, image files missing from the folder. Boxes with zero area, and boxes
that lie wholly outside their image, are dropped from the training targets, counted
in `CocoDetection.dropped` and reported in one warning; a box partly outside its image
is clipped to it. (Evaluation reads the json's own annotations through pycocotools.)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from data import storage
from data.augment import Augment, as_augment
from data.shards import decode_image


class CocoFormatError(ValueError):
    """A COCO json that is broken or does not fit its images; the message names the file."""


def _ids(values, at_most: int = 10) -> str:
    values = sorted(values)
    return ", ".join(map(str, values[:at_most])) + (f", ... ({len(values)} in all)" if len(values) > at_most else "")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_dataset(dataset, path) -> None:
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{path}: the top level is a {type(dataset).__name__}, not a COCO mapping")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise CocoFormatError(
                f"{path}: no list {key!r} at the top level (COCO needs images, annotations, categories)"
            )
    for key, required in (
        ("images", ("id", "file_name")),
        ("categories", ("id", "name")),
        ("annotations", ("id", "image_id", "category_id", "bbox")),
    ):
        for i, entry in enumerate(dataset[key]):
            lacking = [k for k in required if not isinstance(entry, dict) or k not in entry]
            if lacking:
                raise CocoFormatError(f"{path}: {key}[{i}] has no {', '.join(map(repr, lacking))}")
    image_ids = {img["id"] for img in dataset["images"]}
    cat_ids = {cat["id"] for cat in dataset["categories"]}
    for ann in dataset["annotations"]:
        where = f"annotation id {ann['id']} (image {ann['image_id']})"
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(
                f"{path}: {where} has category_id {ann['category_id']!r}, which 'categories' does not list "
                f"(its ids: {_ids(cat_ids)})"
            )
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(
                f"{path}: annotation id {ann['id']} has image_id {ann['image_id']!r}, which 'images' does not list"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoFormatError(f"{path}: {where} has bbox {bbox!r}; a bbox is 4 numbers [x, y, width, height]")


def load_coco(annotations: str | Path) -> COCO:
    """pycocotools COCO object of a checked json (CocoFormatError otherwise), without its prints."""
    path = storage.path(annotations)
    if not storage.exists(path):
        raise FileNotFoundError(f"COCO annotations not found: {path}")
    try:
        with storage.open_read(path) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{path}: not valid JSON ({err})") from None
    return coco_of(dataset, path)


def coco_of(dataset: dict, source: str | Path) -> COCO:
    """pycocotools COCO object of a checked dataset dict (`source` names it in errors)."""
    _check_dataset(dataset, source)  # named in messages only (a local path, a URL's UPath, a label)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _missing_files(images_dir: Path, names: list[str]) -> list[str]:
    """Those of `names` (paths relative to `images_dir`) that are not files; one listing per folder."""
    listed: dict[str, set[str]] = {}
    missing = []
    for name in names:
        folder, _, base = name.rpartition("/")
        if folder not in listed:
            where = images_dir / folder if folder else images_dir
            if storage.is_remote(where):  # one listing of the object prefix
                listed[folder] = set(storage.list_names(where))
            else:
                try:
                    with os.scandir(where) as it:
                        listed[folder] = {e.name for e in it if e.is_file()}
                except (FileNotFoundError, NotADirectoryError):
                    listed[folder] = set()
        if base not in listed[folder]:
            missing.append(name)
    return missing


def _clip_box(bbox: list[float], info: dict) -> tuple[list[float] | None, str | None]:
    """xyxy of a COCO xywh bbox clipped to its image (size from 'width'/'height' when given),
    or (None, why) for a box to drop."""
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, "zero_area"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if _is_number(info.get("width")) and _is_number(info.get("height")):
        x0, x1 = max(x0, 0.0), min(x1, float(info["width"]))
        y0, y1 = max(y0, 0.0), min(y1, float(info["height"]))
        if x1 <= x0 or y1 <= y0:
            return None, "outside_image"
    return [x0, y0, x1, y1], None


class CocoLayout:
    """The COCO layout as a run names it: per split (train, val, holdout) an image folder
    `data.<split>_images` and a json `data.<split>_annotations`. A family that reads
    COCO lists this layout in its `data_formats` (engine/contract.py, `DataLayout`)."""

    name = "coco"

    @staticmethod
    def _keys(split: str) -> tuple[str, str]:
        return f"{split}_images", f"{split}_annotations"

    def missing_keys(self, data, split: str) -> list[str]:
        return [f"data.{k}" for k in self._keys(split) if getattr(data, k) is None]

    def problems(self, data) -> list[str]:
        return []

    def split_files(self, data, split: str) -> list[str]:
        return [getattr(data, f"{split}_annotations")]

    def split_inputs(self, data, split: str) -> list[tuple[str, str | None, str]]:
        images, annotations = self._keys(split)
        return [
            (f"data.{images}", getattr(data, images), "folder"),
            (f"data.{annotations}", getattr(data, annotations), "file"),
        ]


class CocoDetection(Dataset):
    """Samples `(image uint8 [3,H,W], target)` of a COCO json and its image folder.

    target: `boxes_xyxy` float32 [N,4] pixels, `labels` int64 [N] contiguous,
    `image_id` int. With `augment_level=None` the image keeps its original size
    (evaluation); otherwise the level (a name or a `data.augment.Augment`) makes it
    `size` x `size`.
    `limit` keeps the first N images in id order (a label fraction).
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path | COCO,
        augment_level: str | Augment | None = None,
        size: int = 640,
        limit: int | None = None,
        source: str | None = None,
    ):
        """`annotations`: a COCO json, or a COCO object built elsewhere (VOC's XML,
        `data.voc_boxes`), then named in messages by `source`."""
        self.images_dir = storage.path(images_dir)
        self.coco = annotations if isinstance(annotations, COCO) else load_coco(annotations)
        annotations = source or ("the given COCO annotations" if isinstance(annotations, COCO) else annotations)
        self.ids = sorted(self.coco.getImgIds())[:limit]
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.augment = as_augment(augment_level)
        self.size = size
        missing = _missing_files(self.images_dir, [self.coco.imgs[i]["file_name"] for i in self.ids])
        if missing:
            raise CocoFormatError(
                f"{annotations}: {len(missing)} image file(s) listed in 'images' are missing under "
                f"{self.images_dir}: {', '.join(missing[:5])}" + (", ..." if len(missing) > 5 else "")
            )
        self._boxes, self.dropped = self._index_boxes()
        if any(self.dropped.values()):
            warnings.warn(
                f"{annotations}: dropped {self.dropped['zero_area']} annotation(s) with a zero-area box and "
                f"{self.dropped['outside_image']} with a box outside its image",
                stacklevel=2,
            )

    def _index_boxes(self) -> tuple[dict[int, tuple[list, list]], dict[str, int]]:
        """{image_id: (boxes xyxy, labels)} of the images in use, and the dropped boxes' counts."""
        boxes_of: dict[int, tuple[list, list]] = {}
        dropped = {"zero_area": 0, "outside_image": 0}
        for image_id in self.ids:
            info, boxes, labels = self.coco.imgs[image_id], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                box, why = _clip_box(ann["bbox"], info)
                if box is None:
                    dropped[why] += 1
                    continue
                boxes.append(box)
                labels.append(self._label_of[ann["category_id"]])
            boxes_of[image_id] = (boxes, labels)
        return boxes_of, dropped

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def category_id(self, label: int) -> int:
        return self.cat_ids[label]

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> dict:
        image_id = self.ids[index]
        boxes, labels = self._boxes[image_id]
        return {
            "boxes_xyxy": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
        }

    def image(self, index: int) -> torch.Tensor:
        info = self.coco.imgs[self.ids[index]]
        return decode_image((self.images_dir / info["file_name"]).read_bytes())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.image(index), self.target(index)
        if self.augment is not None:
            image, target = self.augment(image, target, self.size)
        return image, target
