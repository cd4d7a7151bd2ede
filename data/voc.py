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


class VocLayout:
    """The VOC layout as a run names it: one `data.voc_root`, a split id list per split
    (`data.voc_train_split`, `voc_val_split`, `voc_holdout_split`) and a folder of labels;
    the train split's mask folder is `data.voc_train_masks`. A family that reads VOC
    lists this layout in its `data_formats` (engine/contract.py, `DataLayout`)."""

    name = "voc"
    SPLIT_KEYS = {"train": "voc_train_split", "val": "voc_val_split", "holdout": "voc_holdout_split"}

    def missing_keys(self, data, split: str) -> list[str]:
        keys = ["voc_root", self.SPLIT_KEYS[split]]
        return [f"data.{k}" for k in keys if getattr(data, k) is None]

    def problems(self, data) -> list[str]:
        if isinstance(data.voc_root, list | tuple):
            return [f"data.voc_root={list(data.voc_root)}: segmentation reads one VOC folder"]
        return []

    def _paths(self, data, split: str) -> dict[str, Path]:
        masks = data.voc_train_masks if split == "train" else "SegmentationClass"
        return split_paths(data.voc_root, getattr(data, self.SPLIT_KEYS[split]), masks)

    def split_files(self, data, split: str) -> list[str]:
        return [str(self._paths(data, split)["list"])]

    def split_inputs(self, data, split: str) -> list[tuple[str, str | None, str]]:
        out = [("data.voc_root", data.voc_root, "folder")]
        if data.voc_root is None or not Path(data.voc_root).is_dir():
            return out  # the root is named once, not every path under it
        paths = self._paths(data, split)
        masks_key = "data.voc_train_masks" if split == "train" else "data.voc_root"
        return out + [
            (f"data.{self.SPLIT_KEYS[split]}", paths["list"], "file"),
            ("data.voc_root", paths["images"], "folder"),
            (masks_key, paths["masks"], "folder"),
        ]


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
