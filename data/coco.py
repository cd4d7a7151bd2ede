"""COCO-format detection data read through pycocotools.

Category ids (any, possibly sparse, as in COCO's 1..90) are mapped to contiguous
labels 0..K-1 in sorted id order, and back with `category_id(label)`. Crowd
annotations (`iscrowd=1`) and degenerate boxes are ignored.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from data.augment import Augment, as_augment
from data.shards import decode_image


def load_coco(annotations: str | Path) -> COCO:
    """pycocotools COCO object, without its prints on stdout."""
    path = Path(annotations)
    if not path.exists():
        raise FileNotFoundError(f"COCO annotations not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


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
        annotations: str | Path,
        augment_level: str | Augment | None = None,
        size: int = 640,
        limit: int | None = None,
    ):
        self.images_dir = Path(images_dir)
        self.coco = load_coco(annotations)
        self.ids = sorted(self.coco.getImgIds())[:limit]
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.augment = as_augment(augment_level)
        self.size = size

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def category_id(self, label: int) -> int:
        return self.cat_ids[label]

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> dict:
        image_id = self.ids[index]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self._label_of[ann["category_id"]])
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
