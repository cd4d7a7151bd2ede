"""The family contract: all that flows/ and tasks/ know about a task family.

A family (detection, segmentation, ...) is an object with the members below; flows
pick one by name from `FAMILIES`. Adding a family means writing one such object and
one line in `FAMILIES`; nothing in flows/ changes. The contract has two halves:
`LabelingFamily`, what the pseudo-label stage needs (a teacher's labels, their
sidecar bytes and statistics), and `TrainingFamily`, what the teacher and student
stages need (data, batches, per-sample losses, evaluation). `AuditFamily` is what
the audit stage needs (the teacher's labels scored against ground truth, threshold by
threshold, and a picture of them). `Family` is all three, plus what the flows show of
a family: its demo (optional) and its statistics' extra rows.

Shared formats:
- a sample is `(image, target)`: image uint8 [3,H,W] RGB; target a dict
  (detection: boxes_xyxy float32 [N,4] pixels + labels int64 [N]; segmentation:
  mask uint8 [H,W], 255 = ignore), augmented by `data.augment.apply_level`;
- a pseudo-label is a target of the same form, or None when the teacher leaves the
  image empty; its sidecar encoding is `encode`/`decode` with extension `sidecar_ext`;
- losses are per sample: each `loss_*` tensor has shape [B], so a mixed batch can be
  split into its human and pseudo parts after one forward pass. The mean over the
  human part (the first `batch["num_human"]` samples) and the mean over the rest are
  each that part's loss; a family may normalize within each part (detection divides
  a part's summed loss by the part's number of matched anchors, segmentation its summed
  pixel cross-entropy by the part's number of labeled pixels).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from configs import DataConfig, ModelConfig, PseudoLabelConfig
from data.augment import Augment
from data.world import Demo


class DataLayout(Protocol):
    """A layout of labeled data on disk (data/coco.py `CocoLayout`, data/voc.py
    `VocLayout`). A family lists the layouts it reads in `data_formats`, by the value
    of `data.format` that selects each; engine/ asks the layout, never the format."""

    name: str

    def missing_keys(self, data: DataConfig, split: str) -> list[str]:
        """The `data.<key>`s that `split` (train, val, holdout) needs and the config leaves unset."""

    def problems(self, data: DataConfig) -> list[str]:
        """Settings this layout cannot take, each naming its key and value ([] when none)."""

    def split_files(self, data: DataConfig, split: str) -> list[str]:
        """The files that list `split`'s images and labels (a stage choosing on it digests them)."""

    def split_inputs(self, data: DataConfig, split: str) -> list[tuple[str, str | None, str]]:
        """(config key, path, "file" or "folder") of each path `split` reads."""


class _Classes(Protocol):
    data_formats: dict[str, DataLayout]  # the layouts this family reads, by `data.format`

    name: str

    def build_model(self, cfg: ModelConfig) -> nn.Module: ...

    def num_classes(self, data: DataConfig) -> int: ...

    def class_names(self, data: DataConfig) -> list[str]:
        """Names of the classes, in label order."""


class LabelingFamily(_Classes, Protocol):
    """What the pseudo-label stage needs: the teacher's labels and their sidecar form."""

    sidecar_ext: str  # "json" (boxes) or "png" (class maps)
    label_unit: str  # what pseudo-label counts count: "boxes", "pixels"

    def label_images(
        self, model: nn.Module, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig
    ) -> list[dict | None]:
        """Un-noised teacher pseudo-labels for a batch of images (None = left empty)."""

    def encode(self, label: dict) -> bytes: ...

    def label_stats(self, label: dict, num_classes: int) -> dict:
        """Additive statistics of one pseudo-label (ints and lists of ints; keys ending
        in `_hist` are histograms over [0, 1] that the statistics artifact draws)."""


class TrainingFamily(_Classes, Protocol):
    """What the teacher and student stages need: batches, losses, evaluation."""

    metric: str  # the headline metric's key in evaluate()'s dict ("AP", "mIoU")
    sidecar_ext: str

    def labeled_dataset(self, data: DataConfig, split: str, augment_level: str | Augment | None) -> Dataset:
        """Human-labeled samples augmented by `augment_level` (a level name, or a
        `data.augment.Augment` with its settings); None keeps original sizes (evaluation)."""

    def collate(self, samples: list[tuple[torch.Tensor, dict]]) -> dict:
        """Equal-size samples -> a batch {"images": uint8 [B,3,S,S], ...}."""

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """One forward pass; {"loss_*": float32 [B]} per sample, whose means over the
        human part and over the pseudo part are the losses of those parts."""

    def decode(self, data: bytes) -> dict:
        """A pseudo-label from its sidecar bytes (`LabelingFamily.encode`'s inverse)."""

    def evaluate(
        self,
        model: nn.Module,
        data: DataConfig,
        batch_size: int = 32,
        num_workers: int = 0,
        split: str = "val",
        results_dir: str | None = None,
    ) -> dict[str, float]:
        """Metrics in percent on `split` (val; holdout for the soup's choices), `metric` among them.
        With `results_dir`, the predictions are also written there, in a format other tools
        read (detection: `detections.json`, COCO's results format; segmentation: one palette
        PNG per image), and nothing else is."""


class AuditFamily(_Classes, Protocol):
    """What the pseudo-label audit needs (engine/audit.py)."""

    audit_legend: str  # what the audit grid's panels show, in one line
    audit_scoring: str  # how a label meets the ground truth, "{iou:g}" filled from audit.iou

    def labeled_dataset(self, data: DataConfig, split: str, augment_level: str | Augment | None) -> Dataset: ...

    def scored_labels(
        self, model: nn.Module, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig
    ) -> list[dict]:
        """The teacher's labels under `rule` with their scores, one per image (never None):
        `at_threshold(label, t)` is the rule's label at any t >= rule.score_threshold."""

    def at_threshold(self, scored: dict, threshold: float) -> dict | None:
        """The pseudo-label the rule gives at `threshold` (None: the image is left empty)."""

    def audit_counts(self, scored: dict, target: dict, thresholds: list[float], num_classes: int, iou: float) -> dict:
        """{"tp", "fp", "fn"}: int arrays [len(thresholds), num_classes] of one image's
        labels at each threshold against its ground truth (`label_unit`s: boxes matched
        at `iou`, or pixels). Additive over images."""

    def draw_audit(self, image: torch.Tensor, label: dict | None, target: dict, class_names: list[str]):
        """uint8 [H,W,3]: a kept pseudo-label (or None) drawn over the image's ground truth."""


class PredictFamily(AuditFamily, Protocol):
    """What `noisy-student predict` needs (engine/predict.py): the audit's `scored_labels`
    and `at_threshold` give an image's kept prediction; these write and draw it."""

    def prediction_output(
        self, index: int, name: str, label: dict | None, class_names: list[str]
    ) -> tuple[list[dict], dict[str, bytes]]:
        """One image's kept prediction (None: nothing kept) as JSON records for
        `predictions.json` and the files it adds beside it (relative path -> bytes)."""

    def draw_prediction(self, image: torch.Tensor, label: dict | None, class_names: list[str]):
        """uint8 [H,W,3]: the prediction drawn over the image."""


class Family(LabelingFamily, TrainingFamily, PredictFamily, Protocol):
    demo: Demo | None  # None: no demo (`noisy-student demo` does not offer it)

    def stats_rows(self, total: dict, unit: str) -> list[tuple[str, str]]:
        """Extra (name, value) rows of the pseudo-label statistics table for the counts
        this family adds to `label_stats`; [] when it adds none."""
