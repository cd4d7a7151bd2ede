"""`noisy-student predict`: a trained model applied to a folder of a user's images or to shards."""

import json
import shutil

import pytest
import torch
from PIL import Image

from configs import RunConfig
from engine.families import FAMILIES
from engine.predict import PredictError, predict_images
from engine.training import MODEL_FILE, save_model
from flows.cli import main
from tests.conftest import tiny_model_config, world_data
from tests.test_contract import data_config
from tests.test_result_files import confident
from tests.test_shards import big_png


def saved(family_name: str, small_world, tmp_path, with_meta: bool = True):
    family = FAMILIES[family_name]
    data = data_config(small_world, family)
    names = family.class_names(data)
    model_cfg = tiny_model_config(num_classes=len(names))
    path = tmp_path / "model" / MODEL_FILE
    meta = (names, data.image_size) if with_meta else (None, None)
    save_model(path, family_name, model_cfg, confident(family.build_model(model_cfg)), *meta)
    return path, names


@pytest.fixture
def user_folder(small_world, tmp_path):
    """A few of the world's images in nested folders, a broken file, one above the pixel limit."""
    folder = tmp_path / "my photos"
    images = sorted(small_world.images_dir.glob("val_*.jpg"))[:5]
    for i, src in enumerate(images):
        dst = folder / ("trip" if i % 2 else "home") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    Image.open(images[0]).save(folder / "home" / "as png.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "huge.png").write_bytes(big_png())
    (folder / "notes.txt").write_text("not an image")
    return folder, len(images) + 1


def test_detection_predict_writes_results_and_pictures(small_world, user_folder, tmp_path):
    path, names = saved("detection", small_world, tmp_path)
    folder, n = user_folder
    out = tmp_path / "out"
    report = predict_images(path, folder, out, threshold=0.3, batch_size=4)
    assert (report["images"], report["corrupt"], report["too_large"]) == (n, 1, 1)
    assert report["classes"] == names and report["skipped"] == ["broken.jpg", "huge.png"]
    records = json.loads((out / "predictions.json").read_text())
    assert records and len(records) == report["records"]
    for r in records:
        assert r["score"] >= 0.3 and r["category"] == names[r["label"]] and len(r["bbox"]) == 4
    assert {r["file_name"] for r in records} <= {p.relative_to(folder).as_posix() for p in folder.rglob("*.*")}
    pictures = sorted(p.relative_to(out / "pictures").as_posix() for p in (out / "pictures").rglob("*.jpg"))
    assert len(pictures) == n and "home/as png.jpg" in pictures
    with Image.open(out / "pictures" / pictures[0]) as im:
        assert im.size[0] > 0
    # a higher threshold keeps fewer boxes, each of them above it
    fewer = predict_images(path, folder, tmp_path / "strict", threshold=0.9, batch_size=4)
    assert fewer["records"] <= report["records"]


def test_segmentation_predict_writes_palette_masks(small_world, user_folder, tmp_path):
    path, names = saved("segmentation", small_world, tmp_path)
    folder, n = user_folder
    out = tmp_path / "out"
    report = predict_images(path, folder, out, threshold=0.0, batch_size=3)
    assert report["images"] == n and report["kept"] == n  # at 0 every pixel is kept
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == n
    for r in records:
        with Image.open(out / r["mask"]) as im:
            assert im.mode == "P"
            with Image.open(folder / r["file_name"]) as src:
                assert im.size == src.size
        assert set(r["classes"]) <= set(names)


def test_predict_reads_shards_too(small_world, tmp_path):
    path, _ = saved("detection", small_world, tmp_path)
    report = predict_images(path, small_world.unlabeled_pattern, tmp_path / "out", threshold=0.5, batch_size=8)
    assert report["images"] > 0 and report["corrupt"] == 0


def test_predict_names_what_it_cannot_use(small_world, user_folder, tmp_path):
    path, names = saved("detection", small_world, tmp_path)
    folder, _ = user_folder
    with pytest.raises(PredictError, match=f"2 class names given .* predicts {len(names)} classes"):
        predict_images(path, folder, tmp_path / "o", classes=["cat", "dog"])
    not_a_model = tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "optimizer": {}}, not_a_model)
    with pytest.raises(PredictError, match="not a model saved by a stage"):
        predict_images(not_a_model, folder, tmp_path / "o")
    with pytest.raises(PredictError, match="neither a folder of images nor a pattern of existing shards"):
        predict_images(path, tmp_path / "nowhere", tmp_path / "o")
    bare, _ = saved("detection", small_world, tmp_path / "bare", with_meta=False)
    with pytest.raises(PredictError, match="give --image-size"):
        predict_images(bare, folder, tmp_path / "o")
    assert predict_images(bare, folder, tmp_path / "o", image_size=128)["classes"][0] == "class 0"


def test_the_cli_prints_a_clear_error_and_the_report(small_world, user_folder, tmp_path, capsys):
    path, _ = saved("detection", small_world, tmp_path)
    folder, n = user_folder
    assert main(["predict", str(path), str(folder), str(tmp_path / "out"), "--classes", "a"]) == 1
    err = capsys.readouterr().err
    assert "noisy-student: 1 class names given (a)" in err and "Traceback" not in err
    assert main(["predict", str(path), str(folder), str(tmp_path / "out"), "--threshold", "0.4"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == n


def test_a_stage_model_records_its_classes_and_size(small_world, tmp_path):
    from engine.training import _write_model, model_info

    family = FAMILIES["detection"]
    cfg = RunConfig(data=world_data(small_world), model=tiny_model_config())
    _write_model(tmp_path, "detection", cfg.model, family.build_model(cfg.model), cfg)
    info = model_info(tmp_path / MODEL_FILE)
    assert info["class_names"] == family.class_names(cfg.data) and info["image_size"] == cfg.data.image_size
