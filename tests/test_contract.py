"""Every family satisfies the contract of tasks/contract.py (parametrized over FAMILIES)."""

import inspect
import json
from pathlib import Path

import pytest
import torch

from configs import DataConfig, PseudoLabelConfig
from tasks.contract import Family
from tasks.families import FAMILIES, get_family
from tests.conftest import tiny_model_config

METHODS = [n for n, v in vars(Family).items() if callable(v) and not n.startswith("_")]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def data_config(world, family) -> DataConfig:
    """The world's data in the family's format (COCO boxes or VOC class maps)."""
    if family.name == "segmentation":
        where = dict(format="voc", voc_root=str(world.voc_root), voc_classes=["background", *world.class_names])
    else:
        where = dict(
            format="coco",
            train_images=str(world.images_dir),
            train_annotations=str(world.train_annotations),
            val_images=str(world.images_dir),
            val_annotations=str(world.val_annotations),
        )
    return DataConfig(**where, unlabeled_shards=world.unlabeled_pattern, image_size=128, num_workers=0)


def without_labels(target: dict) -> dict:
    """The same image with nothing labeled: no boxes, or a mask that is all ignore."""
    out = {}
    for k, v in target.items():
        if k == "mask":
            out[k] = torch.full_like(v, 255)
        elif isinstance(v, torch.Tensor):
            out[k] = v[:0]
        else:
            out[k] = v
    return out


def test_family_has_every_contract_method(family):
    for name in METHODS:
        ours = getattr(family, name)
        assert callable(ours), name
        want = list(inspect.signature(getattr(Family, name)).parameters)[1:]
        got = list(inspect.signature(ours).parameters)
        assert got[: len(want)] == want, (name, got, want)
    assert family.metric and family.sidecar_ext


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError, match="detection"):
        get_family("keypoints")


def test_samples_collate_and_give_per_sample_losses(family, small_world):
    cfg = data_config(small_world, family)
    ds = family.labeled_dataset(cfg, "train", "S1")
    batch = family.collate([ds[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 128, 128) and batch["images"].dtype == torch.uint8
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    losses = family.losses(model, batch)
    assert losses and all(k.startswith("loss_") for k in losses)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in losses.values())


def test_image_without_labels_trains(family, small_world):
    cfg = data_config(small_world, family)
    image, target = family.labeled_dataset(cfg, "train", "S1")[0]
    empty = without_labels(target)
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    losses = family.losses(model, family.collate([(image, empty), (image, target)]))
    assert all(torch.isfinite(v).all() for v in losses.values())
    total = sum(losses.values())
    assert float(total[1].detach()) > 0  # the labeled copy has a loss, the empty one a finite one


def test_empty_predictions_give_no_pseudo_label_and_zero_metrics(family, small_world):
    cfg = data_config(small_world, family)
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    images = [family.labeled_dataset(cfg, "val", None)[i][0] for i in range(2)]
    # a threshold above any score leaves every image empty
    never = PseudoLabelConfig(score_threshold=1.0)
    labels = family.label_images(model, images, 128, never)
    assert labels == [None, None]
    assert family.predict(model, [], 128) == []


def test_pseudo_label_roundtrip_through_sidecar_bytes(family, small_world):
    cfg = data_config(small_world, family)
    torch.manual_seed(0)
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    with torch.no_grad():  # large random weights: confident, arbitrary predictions
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    images = [family.labeled_dataset(cfg, "val", None)[i][0] for i in range(2)]
    labels = family.label_images(model, images, 128, PseudoLabelConfig(score_threshold=0.0))
    for lab in labels:
        assert lab is not None
        back = family.decode(family.encode(lab))
        for k, v in lab.items():
            assert torch.allclose(back[k].float(), v.float(), atol=0.01), k
        stats = family.label_stats(back, family.num_classes(cfg))
        json.dumps(stats)  # additive, JSON-serialisable counts
        assert stats["labels"] > 0


def test_evaluate_returns_the_headline_metric(family, small_world):
    cfg = data_config(small_world, family)
    model = family.build_model(tiny_model_config(num_classes=family.num_classes(cfg)))
    metrics = family.evaluate(model, cfg, batch_size=4)
    assert family.metric in metrics and 0.0 <= metrics[family.metric] <= 100.0


def test_flows_and_tasks_have_no_family_specific_code():
    root = Path(__file__).resolve().parents[1]
    for pkg in ("flows", "tasks"):
        for path in (root / pkg).glob("*.py"):
            if path.name in ("families.py", "contract.py"):
                continue  # the one place that names the families; the contract documents formats
            text = path.read_text()
            for word in ("boxes_xyxy", "RetinaNet", "from detection", "import detection", "segmentation."):
                assert word not in text, f"{path.name} mentions {word!r}"
