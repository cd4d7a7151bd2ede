"""Evaluations leave files other tools read: COCO results json (detection), palette PNGs (segmentation)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from configs import RunConfig
from detection import evaluate as coco_eval
from detection.family import DETECTIONS_FILE
from engine.families import FAMILIES
from engine.training import MODEL_FILE, evaluate_checkpoint, save_model
from segmentation import evaluate as seg_eval
from tests.conftest import tiny_model_config, world_data
from tests.test_contract import data_config


def confident(model: torch.nn.Module) -> torch.nn.Module:
    """Large random weights: confident, arbitrary predictions (some boxes above any threshold)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_detections_json_reads_back_to_the_reported_ap(small_world, tmp_path):
    family = FAMILIES["detection"]
    data = data_config(small_world, family)
    model = confident(family.build_model(tiny_model_config(num_classes=family.num_classes(data))))
    metrics = family.evaluate(model, data, batch_size=4, results_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [DETECTIONS_FILE]
    results = json.loads((tmp_path / DETECTIONS_FILE).read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    dataset = family.labeled_dataset(data, "val", None)
    # the dataset's own ids, as the json names them (not the model's contiguous labels)
    assert {r["image_id"] for r in results} <= set(dataset.coco.getImgIds())
    assert {r["category_id"] for r in results} <= set(dataset.coco.getCatIds())
    again = coco_eval.coco_ap(dataset.coco, results, dataset.ids)  # pycocotools loadRes of the file's records
    assert again == pytest.approx({k: metrics[k] for k in again}, abs=1e-9)


def test_segmentation_writes_one_palette_png_per_image_that_scores_as_reported(small_world, tmp_path):
    family = FAMILIES["segmentation"]
    data = data_config(small_world, family)
    model = confident(family.build_model(tiny_model_config(num_classes=family.num_classes(data))))
    metrics = family.evaluate(model, data, batch_size=4, results_dir=str(tmp_path))
    dataset = family.labeled_dataset(data, "val", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.png" for i in dataset.ids)
    names = family.class_names(data)
    conf = torch.zeros(len(names), len(names), dtype=torch.int64)
    for i, image_id in enumerate(dataset.ids):
        with Image.open(tmp_path / f"{image_id}.png") as im:
            assert im.mode == "P" and im.size == tuple(dataset.mask(i).shape[::-1])
            pred = torch.from_numpy(np.array(im, dtype=np.uint8))
        assert int(pred.max()) < len(names)
        conf += seg_eval.confusion_matrix(pred, dataset.mask(i), len(names))
    assert seg_eval.miou(conf, names)["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-9)


def test_a_new_evaluation_replaces_the_files_of_the_last(small_world, tmp_path):
    family = FAMILIES["detection"]
    data = world_data(small_world)
    cfg = RunConfig(data=data, model=tiny_model_config(num_classes=family.num_classes(data)), eval_batch_size=4)
    save_model(tmp_path / MODEL_FILE, "detection", cfg.model, confident(family.build_model(cfg.model)))
    out = tmp_path / "evaluation"
    out.mkdir()
    (out / "stale.json").write_text("[]")
    evaluate_checkpoint(cfg, tmp_path / MODEL_FILE, "val", out)
    assert sorted(p.name for p in out.iterdir()) == [DETECTIONS_FILE]
