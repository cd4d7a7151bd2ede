"""Every family satisfies the contract of engine/contract.py (parametrized over FAMILIES)."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from configs import DataConfig, PseudoLabelConfig
from engine.contract import Family
from engine.families import FAMILIES, get_family
from tests.conftest import tiny_model_config

PROTOCOLS = [cls for cls in Family.__mro__ if cls.__module__ == Family.__module__]
METHODS = sorted({n for cls in PROTOCOLS for n, v in vars(cls).items() if callable(v) and not n.startswith("_")})
ATTRIBUTES = sorted({n for cls in PROTOCOLS for n in getattr(cls, "__annotations__", {})})


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def data_config(world, family) -> DataConfig:
    """The world's data in the family's format (COCO boxes or VOC class maps)."""
    where, _ = family.demo.data(world)
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
    assert {"name", "metric", "sidecar_ext", "label_unit", "demo"} <= set(ATTRIBUTES)
    for name in ATTRIBUTES:
        assert hasattr(family, name), name
    assert family.metric and family.sidecar_ext and family.label_unit


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


FAMILY_PACKAGES = {"detection", "segmentation"}
# Every member of the contract: methods and attributes of Family and the protocols it joins.
CONTRACT = {
    n
    for cls in Family.__mro__
    if cls.__module__ == Family.__module__
    for n in [*vars(cls), *getattr(cls, "__annotations__", {})]
    if not n.startswith("_")
}


def family_branches(source: str) -> list[str]:
    """Every place in `source` that could tell one family from another: a family's name
    as a string (compared, matched, a dict key, a default), an import of a family's
    package, a family class named, or a contract member probed with hasattr/getattr."""
    names = set(FAMILIES)
    classes = {type(f).__name__ for f in FAMILIES.values()}
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(f"{where}: the family name {node.value!r}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in FAMILY_PACKAGES]
        elif isinstance(node, ast.Name | ast.Attribute):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if ident in classes:
                found.append(f"{where}: names {ident}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            probed = node.args[1].value if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) else None
            if probed in CONTRACT and (node.func.id == "hasattr" or len(node.args) == 3):
                found.append(f"{where}: probes {probed!r} with {node.func.id}")
    return found


def test_the_branch_finder_sees_every_form_of_a_branch():
    forms = {
        "if cfg.family == 'segmentation': pass": "the family name",
        "match cfg.family:\n    case 'detection': pass": "the family name",
        "x = {'detection': 1}[cfg.family]": "the family name",
        "def f(family='segmentation'): pass": "the family name",
        "from detection.retinanet import RetinaNet": "imports detection",
        "import segmentation.pseudo": "imports segmentation",
        "ok = isinstance(f, DetectionFamily)": "names DetectionFamily",
        "if hasattr(family, 'label_unit'): pass": "probes",
        "unit = getattr(family, 'label_unit', 'boxes')": "probes",
    }
    for source, what in forms.items():
        assert any(what in f for f in family_branches(source)), source
    assert family_branches("if family.metric == 'AP': pass\nmetric = get_family(cfg.family).metric") == []


def test_flows_tasks_and_engine_have_no_family_specific_code():
    root = Path(__file__).resolve().parents[1]
    for pkg in ("flows", "tasks", "engine"):
        for path in (root / pkg).glob("*.py"):
            if path.name in ("families.py", "contract.py"):
                continue  # the one place that names the families; the contract documents formats
            text = path.read_text()
            assert family_branches(text) == [], f"{path.name}: {family_branches(text)}"
            for word in ("boxes_xyxy", "RetinaNet", "segmentation.", '"coco"', '"voc"', '"boxes"', '"pixels"'):
                assert word not in text, f"{path.name} mentions {word!r}"
