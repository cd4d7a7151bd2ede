"""PASCAL VOC detection annotations, read into the COCO form the detection family evaluates.

    <root>/JPEGImages/<id>.jpg
    <root>/Annotations/<id>.xml           one <object> per box: <name>, <difficult>,
                                          <bndbox> xmin, ymin, xmax, ymax (1-based pixels)
    <root>/ImageSets/Main/<split>.txt     one id per line

Several roots combine (VOC2007 + VOC2012 trainval, the usual training set): a split is
read from every root, or named per root as `FOLDER/split`, joined by `+`
(`VOC2007/test`, `VOC2007/trainval+VOC2012/trainval`). The ids become one COCO dataset
(`voc_coco`): image ids 1..N in list order, category ids 1..K in `class_names` order,
boxes converted from VOC's 1-based inclusive corners to COCO's x, y, w, h (x = xmin - 1,
w = xmax - xmin + 1). Objects marked `difficult` become `iscrowd` annotations: left out
of training (as every crowd box is) and, in pycocotools' evaluation, neither matched nor
missed, as VOC's own evaluation ignores them. A file that is not valid XML, lacks the
image size, names an unknown class or holds a coordinate that is no number fails with
the file and the reason; boxes outside the image are clipped or dropped and counted by
the COCO reader (`data.coco.CocoDetection`).
"""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from pycocotools.coco import COCO

from data import storage
from data.coco import CocoDetection, coco_of
from data.voc import VOC_CLASSES, VocLayout, read_ids

VOC_DETECTION_CLASSES = VOC_CLASSES[1:]  # the 20 object classes (no background)


class VocFormatError(ValueError):
    """A VOC annotation file that cannot be read; the message names the file and why."""


def _text(node: ET.Element, tag: str, path: str, what: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise VocFormatError(f"{path}: {what} has no <{tag}>")
    return found.text.strip()


def _number(node: ET.Element, tag: str, path: str, what: str) -> float:
    text = _text(node, tag, path, what)
    try:
        return float(text)
    except ValueError:
        raise VocFormatError(f"{path}: {what} <{tag}> is {text!r}, not a number") from None


def read_annotation(path: str | Path) -> dict:
    """{"width", "height", "objects": [{"name", "box": [xmin, ymin, xmax, ymax] (1-based,
    as written), "difficult": bool}]} of one Annotations/<id>.xml."""
    try:
        root = ET.fromstring(storage.read_bytes(path))
    except FileNotFoundError:
        raise VocFormatError(f"{path}: no such annotation file") from None
    except ET.ParseError as err:
        raise VocFormatError(f"{path}: not valid XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise VocFormatError(f"{path}: no <size> (width and height of the image)")
    width, height = (_number(size, t, str(path), "<size>") for t in ("width", "height"))
    objects = []
    for i, obj in enumerate(root.findall("object")):
        what = f"object {i}"
        name = _text(obj, "name", str(path), what)
        box = obj.find("bndbox")
        if box is None:
            raise VocFormatError(f"{path}: {what} ({name}) has no <bndbox>")
        coords = [_number(box, t, str(path), f"{what} ({name})") for t in ("xmin", "ymin", "xmax", "ymax")]
        difficult = obj.find("difficult")
        objects.append(
            {
                "name": name,
                "box": coords,
                "difficult": difficult is not None and (difficult.text or "0").strip() == "1",
            }
        )
    return {"width": width, "height": height, "objects": objects}


def split_lists(roots: list[str], spec: str) -> list[tuple[str, Path]]:
    """(root, its ImageSets/Main list file) of each part of a split spec, in order: `name`
    from every root, or `FOLDER/name` parts joined by `+`, FOLDER being a root's folder name."""
    by_folder = {Path(storage.text(r)).name: r for r in roots}
    out = []
    for part in spec.split("+"):
        folder, _, name = part.strip().rpartition("/")
        if folder and folder not in by_folder:
            raise ValueError(f"split {spec!r} names the folder {folder!r}; the roots are {sorted(by_folder)}")
        for root in [by_folder[folder]] if folder else roots:
            out.append((root, Path(storage.text(root)) / "ImageSets" / "Main" / f"{name}.txt"))
    return out


def split_ids(roots: list[str], spec: str) -> list[tuple[str, str]]:
    """(root, id) of a split spec (`split_lists`), in list order."""
    return [(root, i) for root, lst in split_lists(roots, spec) for i in read_ids(lst)]


def voc_coco(ids: list[tuple[str, str]], class_names: list[str]) -> tuple[dict, str]:
    """A COCO dataset dict of `(root, id)` pairs, and the folder its `file_name`s are
    relative to (the roots' common parent)."""
    roots = sorted({r for r, _ in ids})
    base = os.path.commonpath([os.fspath(storage.local(r)) for r in roots]) if roots else "."
    category = {n: i + 1 for i, n in enumerate(class_names)}
    images, annotations = [], []
    for image_id, (root, ident) in enumerate(ids, 1):
        xml = storage.join(root, "Annotations", f"{ident}.xml")
        ann = read_annotation(xml)
        rel = os.path.relpath(os.fspath(storage.join(root, "JPEGImages", f"{ident}.jpg")), base)
        images.append({"id": image_id, "file_name": rel, "width": ann["width"], "height": ann["height"]})
        for obj in ann["objects"]:
            if obj["name"] not in category:
                raise VocFormatError(f"{xml}: class {obj['name']!r} is not one of {', '.join(class_names)}")
            xmin, ymin, xmax, ymax = obj["box"]
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category[obj["name"]],
                    "bbox": [xmin - 1, ymin - 1, w, h],
                    "area": max(w, 0) * max(h, 0),
                    "iscrowd": int(obj["difficult"]),
                }
            )
    categories = [{"id": i, "name": n} for n, i in category.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, base


def _roots(data) -> list[str]:
    return list(data.voc_root) if isinstance(data.voc_root, list | tuple) else [data.voc_root]


def class_names(data) -> list[str]:
    return list(data.voc_classes) if data.voc_classes else list(VOC_DETECTION_CLASSES)


@functools.lru_cache(maxsize=8)
def _coco(roots: tuple[str, ...], spec: str, names: tuple[str, ...], stamp: tuple) -> tuple[COCO, str]:
    dataset, base = voc_coco(split_ids(list(roots), spec), list(names))
    return coco_of(dataset, f"VOC split {spec!r} of {', '.join(roots)}"), base


def _stamp(roots: list[str], spec: str) -> tuple:
    """The split lists' modification times: a list edited since is read again."""
    return tuple(p.stat().st_mtime_ns if p.exists() else None for _, p in split_lists(roots, spec))


def voc_detection(data, split: str, augment_level=None, size: int = 640, limit: int | None = None) -> CocoDetection:
    """The detection samples of a VOC split (train, val, holdout) as a `CocoDetection`."""
    spec = getattr(data, VocBoxesLayout.SPLIT_KEYS[split])
    if spec is None:
        raise ValueError(f"the {split} split needs data.{VocBoxesLayout.SPLIT_KEYS[split]}")
    roots = _roots(data)
    coco, base = _coco(tuple(roots), spec, tuple(class_names(data)), _stamp(roots, spec))
    return CocoDetection(base, coco, augment_level, size, limit, source=f"VOC split {spec!r}")


class VocBoxesLayout(VocLayout):
    """VOC's detection layout as a run names it: the keys of `VocLayout`, but
    `data.voc_root` may be a list of folders and a split is a spec (see `split_ids`);
    boxes in `Annotations/`, class names `data.voc_classes` (default: the 20 VOC
    classes). Listed by the detection family under `data.format: voc`."""

    def problems(self, data) -> list[str]:
        folders = {Path(storage.text(r)).name for r in _roots(data) if r is not None}
        out = []
        for key in self.SPLIT_KEYS.values():
            for part in (getattr(data, key) or "").split("+"):
                folder = part.strip().rpartition("/")[0]
                if folder and folder not in folders:
                    spec = getattr(data, key)
                    out.append(f"data.{key}={spec!r} names the folder {folder!r}, not one of data.voc_root")
        return out

    def _lists(self, data, split: str) -> list[tuple[str, Path]]:
        return split_lists(_roots(data), getattr(data, self.SPLIT_KEYS[split]))

    def split_files(self, data, split: str) -> list[str]:
        return [str(p) for _, p in self._lists(data, split)]

    def split_inputs(self, data, split: str) -> list[tuple[str, str | None, str]]:
        out = [("data.voc_root", r, "folder") for r in _roots(data)]
        if not all(r is not None and Path(storage.text(r)).is_dir() for r in _roots(data)):
            return out  # a root is named once, not every path under it
        for root, lst in self._lists(data, split):
            out += [
                (f"data.{self.SPLIT_KEYS[split]}", lst, "file"),
                ("data.voc_root", Path(storage.text(root)) / "JPEGImages", "folder"),
                ("data.voc_root", Path(storage.text(root)) / "Annotations", "folder"),
            ]
        return out
