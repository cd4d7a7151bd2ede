"""The detection family: RetinaNet on an EfficientNet pyramid, COCO data, box pseudo-labels.

`DetectionFamily` satisfies the family contract of `engine/contract.py`; it is the only
place where detection reads configuration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from configs import DataConfig, ModelConfig, PseudoLabelConfig
from data import storage
from data.augment import Augment, letterbox
from data.coco import CocoDetection, CocoLayout
from data.files import atomic_write
from data.mixing import list_collate, loader_options
from data.voc_boxes import VocBoxesLayout, voc_detection
from data.world import Demo, WorldPaths, WorldSpec
from detection import evaluate as coco_eval
from detection import pseudo
from detection.retinanet import RetinaNet
from nets.backbone import build_backbone, model_input
from nets.necks import build_neck


def _coco_world(world: WorldPaths) -> tuple[dict, int]:
    """The data section of a written world's COCO layout, and its class count."""
    data = {
        "format": "coco",
        "train_images": str(world.images_dir),
        "train_annotations": str(world.train_annotations),
        "val_images": str(world.images_dir),
        "val_annotations": str(world.val_annotations),
    }
    if world.holdout_annotations.exists():
        data |= {"holdout_images": str(world.images_dir), "holdout_annotations": str(world.holdout_annotations)}
    return data, world.num_classes


# The demo's world is easier than the renderer's defaults, so that a from-scratch B0
# teacher on 200 labeled images reaches the paper's regime (30+ AP) within the demo's
# budget: upright shapes of near-unit aspect, at most one distractor (occlusion stays:
# 1-4 objects per scene in random draw order), calmer textures (background contrast
# 10-50, noise 8) and a higher colour-contrast floor (60).
DEMO = Demo(
    presets=("demo", "demo-quick"),
    world=WorldSpec(
        object_size=(20.0, 60.0),
        aspect=(0.75, 1.33),
        rotate=False,
        distractors_per_image=(0, 1),
        background_contrast=(10.0, 50.0),
        noise_std=8.0,
        min_contrast=60.0,
    ),
    data=_coco_world,
)


DETECTIONS_FILE = "detections.json"  # what an evaluation with a results_dir writes


class DetectionFamily:
    name = "detection"
    metric = "AP"
    sidecar_ext = "json"
    label_unit = "boxes"
    data_formats = {"coco": CocoLayout(), "voc": VocBoxesLayout()}
    demo = DEMO

    # ------------------------------------------------------------------ model

    def build_model(self, cfg: ModelConfig) -> RetinaNet:
        backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=cfg.backbone_checkpoint)
        neck = build_neck(
            cfg.neck, backbone.channels, cfg.neck_channels, num_repeats=cfg.nasfpn_repeats, separable=cfg.separable
        )
        return RetinaNet(
            backbone, neck, cfg.num_classes, anchor_scale=cfg.anchor_scale, head_norm=cfg.head_norm, dropout=cfg.dropout
        )

    # ------------------------------------------------------------------ data

    def labeled_dataset(self, data: DataConfig, split: str, augment_level: str | Augment | None) -> CocoDetection:
        if data.format == "voc":  # VOC's XML boxes, read into the same COCO form
            limit = data.labeled_limit if split == "train" else None
            return voc_detection(data, split, augment_level, data.image_size, limit)
        if split == "train":
            return CocoDetection(
                data.train_images, data.train_annotations, augment_level, data.image_size, data.labeled_limit
            )
        if split == "val":
            return CocoDetection(data.val_images, data.val_annotations, augment_level, data.image_size)
        if split == "holdout":
            if data.holdout_images is None or data.holdout_annotations is None:
                raise ValueError("the holdout split needs data.holdout_images and data.holdout_annotations")
            return CocoDetection(data.holdout_images, data.holdout_annotations, augment_level, data.image_size)
        raise ValueError(f"unknown split {split!r}; valid: train, val, holdout")

    def class_names(self, data: DataConfig) -> list[str]:
        return self.labeled_dataset(data, "val", None).class_names

    def num_classes(self, data: DataConfig) -> int:
        return len(self.class_names(data))

    def collate(self, samples: list[tuple[torch.Tensor, dict]]) -> dict:
        """Samples of equal size -> {"images": uint8 [B,3,S,S], "targets": [dict]}."""
        return {"images": torch.stack([s[0] for s in samples]), "targets": [s[1] for s in samples]}

    # ------------------------------------------------------------------ training

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-image shares {loss_cls, loss_box}, each [B] float32.

        The human part (the first `batch["num_human"]` images, all by default) and the
        pseudo part are each normalised by their own number of matched anchors, so the
        mean over either part is that part's loss (`RetinaNet.loss`).
        """
        images = model_input(batch["images"], model)
        b = len(batch["targets"])
        num_human = batch.get("num_human", b)
        return model.loss(model(images), batch["targets"], group_sizes=(num_human, b - num_human))

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, model: RetinaNet, images: list[torch.Tensor], image_size: int) -> list[dict]:
        """Evaluation detections in each image's own pixel coordinates, from the model in
        eval mode (`RetinaNet.postprocess`: score > 0.05, NMS 0.5, at most 100).

        Each image is letterboxed to `image_size` (long side); the module's train/eval
        mode is restored afterwards.
        """
        return self._detect(model, images, image_size, model.postprocess)

    @torch.no_grad()
    def _detect(
        self, model: RetinaNet, images: list[torch.Tensor], image_size: int, select: Callable[..., list[dict]]
    ) -> list[dict]:
        """Letterbox, one eval-mode forward, `select(outputs, image_sizes)`, back to each image's frame."""
        if not images:
            return []
        was_training = model.training
        model.eval()
        batch, scales, sizes = [], [], []
        for im in images:
            h, w = im.shape[-2:]
            boxed, _, scale = letterbox(im, {}, image_size)
            batch.append(boxed)
            scales.append(scale)
            sizes.append((min(image_size, round(h * scale)), min(image_size, round(w * scale))))
        try:
            dets = select(model(model_input(torch.stack(batch), model)), sizes)
        finally:
            model.train(was_training)
        for d, scale in zip(dets, scales):
            d["boxes_xyxy"] = (d["boxes_xyxy"] / scale).cpu()
            d["scores"], d["labels"] = d["scores"].cpu(), d["labels"].cpu()
        return dets

    def label_images(self, model: RetinaNet, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig):
        """Teacher pseudo-labels (or None for an image left empty), defaults of docs/recipe.md, Pseudo-labels.

        The rule owns all the filtering: the model hands over its undeduplicated
        candidates scoring >= the rule's threshold, and `to_pseudo_label` applies the
        threshold, NMS, the per-class cap and `max_boxes`, once each.
        """
        preds = self._detect(model, images, image_size, partial(model.candidates, min_score=rule.score_threshold))
        return [self.to_pseudo_label(p, rule) for p in preds]

    def to_pseudo_label(self, prediction: dict, rule: PseudoLabelConfig) -> dict | None:
        return pseudo.select_boxes(prediction, rule.score_threshold, rule.nms_iou, rule.max_boxes, rule.per_class_cap)

    def encode(self, label: dict) -> bytes:
        return pseudo.encode(label)

    def decode(self, data: bytes) -> dict:
        return pseudo.decode(data)

    def label_stats(self, label: dict, num_classes: int) -> dict:
        return pseudo.stats(label, num_classes)

    def stats_rows(self, total: dict, unit: str) -> list[tuple[str, str]]:
        return []

    # ------------------------------------------------------------------ audit

    audit_legend = "green: ground truth; coloured: the teacher's kept boxes (class, score)"
    audit_scoring = "a box matches at IoU >= {iou:g}"

    def scored_labels(self, model: RetinaNet, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig):
        """The rule's boxes at its threshold, with their scores (no box: an empty label).

        Keeping the boxes scoring >= t of these gives exactly the rule's label at any t
        above the rule's threshold: NMS only lets a box suppress lower-scored ones, and
        the caps keep the highest scores."""
        labels = self.label_images(model, images, image_size, rule)
        empty = {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
        return [label if label is not None else empty for label in labels]

    def at_threshold(self, scored: dict, threshold: float) -> dict | None:
        keep = scored["scores"] >= threshold
        if not bool(keep.any()):
            return None
        return {k: v[keep] for k, v in scored.items()}

    def audit_counts(self, scored: dict, target: dict, thresholds: list[float], num_classes: int, iou: float) -> dict:
        """True positives, false positives and missed boxes [T][C] at each threshold: a
        label matches the unmatched ground-truth box of its class that it overlaps most,
        at IoU >= `iou`, labels taken in descending score (as COCO matches)."""
        return pseudo.match_counts(scored, target, thresholds, num_classes, iou)

    def draw_audit(self, image: torch.Tensor, label: dict | None, target: dict, class_names: list[str]):
        return pseudo.draw_boxes(image, label, target, class_names)

    # ------------------------------------------------------------------ predict

    def prediction_output(self, index: int, name: str, label: dict | None, class_names: list[str]):
        """COCO's results format (bbox x, y, w, h in pixels, score) with the file's name and
        the class's name beside its contiguous label; no file of its own."""
        if label is None:
            return [], {}
        records = [
            {
                "image_id": index,
                "file_name": name,
                "label": c,
                "category": class_names[c],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": s,
            }
            for (x0, y0, x1, y1), c, s in zip(
                label["boxes_xyxy"].tolist(), label["labels"].tolist(), label["scores"].tolist()
            )
        ]
        return records, {}

    def draw_prediction(self, image: torch.Tensor, label: dict | None, class_names: list[str]):
        none = {"boxes_xyxy": torch.zeros(0, 4)}
        return pseudo.draw_boxes(image, label, none, class_names, zoom=1)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(
        self,
        model: RetinaNet,
        data: DataConfig,
        batch_size: int = 32,
        num_workers: int = 0,
        split: str = "val",
        results_dir: str | None = None,
    ) -> dict[str, float]:
        """COCO box metrics (percent) on `split` (val); with `results_dir`, its
        `detections.json` in COCO's results format (the dataset's own image and category
        ids), which pycocotools' `loadRes` reads back to the same metrics."""
        dataset = self.labeled_dataset(data, split, None)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=list_collate, **loader_options(num_workers))
        results = []
        for samples in loader:
            preds = self.predict(model, [s[0] for s in samples], data.image_size)
            for (_, target), pred in zip(samples, preds):
                results += coco_eval.coco_results(target["image_id"], pred, dataset.cat_ids)
        if results_dir is not None:
            atomic_write(storage.join(results_dir, DETECTIONS_FILE), lambda f: f.write(json.dumps(results).encode()))
        return coco_eval.coco_ap(dataset.coco, results, dataset.ids)
