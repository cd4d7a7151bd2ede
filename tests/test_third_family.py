"""A third family, defined here and nowhere else, runs the teacher, pseudo-label and
student flows: flows/ and tasks/ know families only through engine/contract.py.

The toy family labels whole images: which of the world's shape classes appear in an
image (multi-label), from a small convolutional network with a per-class sigmoid.
Its pseudo-label is the set of classes the teacher scores above the threshold; its audit
counts those classes against the classes present.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs import AuditConfig, DataConfig, ModelConfig, PseudoLabelConfig, RunConfig, StudentConfig, TrainConfig
from data.augment import Augment
from data.coco import CocoDetection, CocoLayout
from data.mixing import list_collate
from data.world import Demo, WorldPaths
from engine import families
from engine.contract import Family, LabelingFamily, TrainingFamily
from engine.rundir import RunDir, read_manifest
from flows import stages
from tests.conftest import world_data


class Presence(Dataset):
    """The COCO samples with their boxes turned into a multi-hot class vector."""

    def __init__(self, boxes: CocoDetection, num_classes: int):
        self.boxes, self.num_classes = boxes, num_classes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i):
        image, target = self.boxes[i]
        present = torch.zeros(self.num_classes)
        present[target["labels"] - 1] = 1.0  # COCO category ids start at 1
        return image, {"present": present}


class ImageLabelsFamily:
    name = "image-labels"
    metric = "accuracy"
    sidecar_ext = "json"
    label_unit = "classes"
    data_formats = {"coco": CocoLayout()}
    demo: Demo | None = None

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, cfg.num_classes),
        )

    def labeled_dataset(self, data: DataConfig, split: str, augment_level: str | Augment | None) -> Dataset:
        images, annotations = (
            (data.train_images, data.train_annotations) if split == "train" else (data.val_images, data.val_annotations)
        )
        size = data.image_size
        return Presence(CocoDetection(images, annotations, augment_level or "none", size), self.num_classes(data))

    def class_names(self, data: DataConfig) -> list[str]:
        return CocoDetection(data.val_images, data.val_annotations, None, data.image_size).class_names

    def num_classes(self, data: DataConfig) -> int:
        return len(self.class_names(data))

    def collate(self, samples):
        return {
            "images": torch.stack([s[0] for s in samples]),
            "present": torch.stack([s[1]["present"] for s in samples]),
        }

    def _scores(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        param = next(model.parameters())
        return model(images.to(param.device, param.dtype) / 255.0)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = self._scores(model, batch["images"])
        target = batch["present"].to(logits.device)
        return {"loss_bce": F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)}

    @torch.no_grad()
    def scored_labels(self, model, images, image_size, rule: PseudoLabelConfig):
        was = model.training
        model.eval()
        resized = torch.stack([F.interpolate(i[None].float(), size=(image_size, image_size))[0] for i in images])
        scores = torch.sigmoid(self._scores(model, resized))
        model.train(was)
        return [{"scores": s} for s in scores]

    def at_threshold(self, scored: dict, threshold: float) -> dict | None:
        present = (scored["scores"] >= threshold).float()
        return {"present": present} if present.any() else None

    def label_images(self, model, images, image_size, rule: PseudoLabelConfig):
        return [self.at_threshold(s, rule.score_threshold) for s in self.scored_labels(model, images, image_size, rule)]

    audit_legend = "images (image-level classes are not drawn)"
    audit_scoring = "class by class"

    def audit_counts(self, scored, target, thresholds, num_classes, iou):
        present = target["present"].bool().numpy()
        kept = np.stack([(scored["scores"] >= t).numpy() for t in thresholds])
        return {"tp": kept & present, "fp": kept & ~present, "fn": ~kept & present}

    def draw_audit(self, image, label, target, class_names):
        return image.permute(1, 2, 0).numpy()

    def prediction_output(self, index: int, name: str, label: dict | None, class_names: list[str]):
        present = [] if label is None else [class_names[c] for c in label["present"].nonzero().flatten().tolist()]
        return [{"image_id": index, "file_name": name, "classes": present}], {}

    def draw_prediction(self, image, label, class_names):
        return image.permute(1, 2, 0).numpy()

    def encode(self, label: dict) -> bytes:
        return json.dumps(label["present"].tolist()).encode()

    def decode(self, data: bytes) -> dict:
        return {"present": torch.tensor(json.loads(data))}

    def label_stats(self, label: dict, num_classes: int) -> dict:
        counts = label["present"].long().tolist()
        return {"labels": sum(counts), "class_counts": counts}

    def stats_rows(self, total: dict, unit: str) -> list[tuple[str, str]]:
        return [(f"{unit} per kept image", f"{total['labels'] / max(1, total['kept']):.2f}")]

    @torch.no_grad()
    def evaluate(
        self,
        model,
        data: DataConfig,
        batch_size: int = 32,
        num_workers: int = 0,
        split: str = "val",
        results_dir: str | None = None,
    ) -> dict[str, float]:
        model.eval()
        right = total = 0
        classes = []
        loader = DataLoader(self.labeled_dataset(data, split, None), batch_size=batch_size, collate_fn=list_collate)
        for samples in loader:
            batch = self.collate(samples)
            predicted = (self._scores(model, batch["images"]) >= 0).float()
            right += int((predicted == batch["present"]).sum())
            total += batch["present"].numel()
            classes += [row.nonzero().flatten().tolist() for row in predicted]
        if results_dir is not None:
            (Path(results_dir) / "classes.json").write_text(json.dumps(classes))
        return {"accuracy": 100.0 * right / max(1, total)}


def test_the_toy_family_fulfils_both_halves_of_the_contract():
    family = ImageLabelsFamily()
    for protocol in (LabelingFamily, TrainingFamily, Family):
        members = [n for n in dir(protocol) if not n.startswith("_")]
        assert all(hasattr(family, n) for n in members), protocol


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, ImageLabelsFamily.name, ImageLabelsFamily())
    return families.FAMILIES[ImageLabelsFamily.name]


def test_a_third_family_runs_every_flow_unchanged(prefect_harness, toy_family, small_world: WorldPaths, tmp_path):
    train = TrainConfig(steps=4, batch_size=4, warmup_steps=0, augment_level="S1", checkpoint_every=2, log_every=2)
    cfg = RunConfig(
        family=toy_family.name,
        out_dir=str(tmp_path / "run"),
        data=world_data(small_world),
        model=ModelConfig(backbone="test_efficientnet", num_classes=small_world.num_classes),
        teacher=train,
        pseudo=PseudoLabelConfig(score_threshold=0.3, batch_size=8),
        student=StudentConfig(train=train.model_copy(update={"augment_level": "S2"})),
        eval_batch_size=8,
    )
    teacher = stages.teacher_flow(cfg)
    audited = stages.audit_flow(cfg.model_copy(update={"audit": AuditConfig(split="val", images=4)}), 0)
    pseudo = stages.pseudo_label_flow(cfg, 0)
    student = stages.student_flow(cfg, 0)

    assert 0.0 <= teacher["metrics"]["accuracy"] <= 100.0 and teacher["metric"] == "accuracy"
    assert audited["f1_threshold"] in AuditConfig().thresholds
    assert pseudo["stats"]["images"] == 16  # the small world's unlabeled pool
    assert pseudo["stats"]["kept"] > 0  # an untrained sigmoid sits near 0.5, above the 0.3 threshold
    assert len(pseudo["stats"]["class_counts"]) == small_world.num_classes
    assert 0.0 <= student["metrics"]["accuracy"] <= 100.0
    run = RunDir(cfg.out_dir)
    for stage in (run.stage(0, "teacher"), run.stage(0, "pseudo"), run.stage(0, "student")):
        assert read_manifest(stage) is not None, stage
    assert stages.student_flow(cfg, 0) == student  # finished: the rerun skips
