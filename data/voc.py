"""PASCAL VOC semantic segmentation data (the layout of VOC2012 and of the embedded world).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png          palette PNG: pixel value = class index,
                                               255 = ignore (object borders, "difficult")
    <root>/ImageSets/Segmentation/<split>.txt  one id per line

The SBD-augmented train set ("train_aug", 10,582 images) is the same layout with its
own id list (`ImageSets/Segmentation/train_aug.txt`) and, usually, its own mask folder
(`SegmentationClassAug/`, grey-scale PNGs holding class indices); both are settings.
A mask is read as its raw pixel values, never through the palette's colours.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data import storage
from data.augment import IGNORE, Augment, as_augment
from data.shards import decode_image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def split_paths(root: str | Path, split: str, masks: str = "SegmentationClass") -> dict[str, Path]:
    """What one split reads under `root`: its id list, the image folder, its mask folder."""
    root = storage.path(root)
    return {
        "list": root / "ImageSets" / "Segmentation" / f"{split}.txt",
        "images": root / "JPEGImages",
        "masks": root / masks,
    }


def read_ids(path: str | Path) -> list[str]:
    """Ids of a VOC split file, in file order (blank lines skipped)."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"VOC split list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} lists an id twice")
    return ids


def read_mask(path: str | Path) -> torch.Tensor:
    """Class-index mask uint8 [H,W] of a palette ('P') or grey-scale ('L') PNG."""
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: mask mode {im.mode!r}; VOC masks are palette (P) or grey (L) PNGs")
        return torch.from_numpy(np.array(im, dtype=np.uint8))


class VOCSegmentation(Dataset):
    """Samples `(image uint8 [3,H,W], {"mask": uint8 [H,W], "image_id": str})` of one split.

    With `augment_level=None` image and mask keep their original size (evaluation);
    otherwise the level (a name or a `data.augment.Augment`) makes both `size` x `size` (masks resampled
    nearest, padded with 255). `limit` keeps the first N ids (a label fraction).
    Mask values must be class indices below `num_classes` or 255; others raise.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        augment_level: str | Augment | None = None,
        size: int = 512,
        limit: int | None = None,
        masks: str = "SegmentationClass",
        num_classes: int = len(VOC_CLASSES),
    ):
        self.root = storage.path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root not found: {self.root}")
        paths = split_paths(self.root, split, masks)
        self.ids = read_ids(paths["list"])[:limit]
        if not self.ids:
            raise ValueError(f"VOC split {split!r} under {self.root} lists no image")
        self.mask_dir = paths["masks"]
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(f"VOC mask folder not found: {self.mask_dir}")
        self.split, self.size, self.num_classes = split, size, num_classes
        self.augment = as_augment(augment_level)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> torch.Tensor:
        return decode_image((self.root / "JPEGImages" / f"{self.ids[index]}.jpg").read_bytes())

    def mask(self, index: int) -> torch.Tensor:
        mask = read_mask(self.mask_dir / f"{self.ids[index]}.png")
        bad = mask[(mask >= self.num_classes) & (mask != IGNORE)]
        if bad.numel():
            raise ValueError(
                f"mask of {self.ids[index]!r} holds value {int(bad[0])}; "
                f"valid: 0..{self.num_classes - 1} and {IGNORE} (ignore)"
            )
        return mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, mask = self.image(index), self.mask(index)
        if image.shape[-2:] != mask.shape:
            raise ValueError(
                f"{self.ids[index]!r}: image {tuple(image.shape[-2:])} and mask {tuple(mask.shape)} differ in size"
            )
        target = {"mask": mask, "image_id": self.ids[index]}
        if self.augment is not None:
            image, target = self.augment(image, target, self.size)
        return image, target
