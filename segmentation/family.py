"""The segmentation family: a NAS-FPN segmenter, PASCAL VOC data, pixel pseudo-labels, mIoU.

`SegmentationFamily` satisfies the family contract of `engine/contract.py`; it is the
only place where segmentation reads configuration. Class 0 is background, so a VOC
config has 21 classes and `model.num_classes` counts the background.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from configs import DataConfig, ModelConfig, PseudoLabelConfig
from data import storage
from data.augment import Augment, crop_pad, resize
from data.files import atomic_write
from data.mixing import list_collate, loader_options
from data.voc import VOC_CLASSES, VocLayout, VOCSegmentation
from data.world import Demo, WorldPaths, WorldSpec, encode_voc_png
from nets.backbone import build_backbone, model_input
from nets.necks import build_neck
from segmentation import evaluate as seg_eval
from segmentation import pseudo
from segmentation.model import Segmenter


@torch.no_grad()
def _voc_world(world: WorldPaths) -> tuple[dict, int]:
    """The data section of a written world's VOC layout, and its class count (background first)."""
    data = {"format": "voc", "voc_root": str(world.voc_root), "voc_classes": ["background", *world.class_names]}
    if world.holdout_annotations.exists():  # the split's COCO json marks that the world has one
        data["voc_holdout_split"] = "holdout"
    return data, world.num_classes + 1


# Segmentation tells shapes apart pixel by pixel from stride-8 features, so its demo
# world draws larger shapes (32-72 px: a 32 px triangle is four P3 cells wide), upright
# and unstretched, with at most one distractor; its textures keep the renderer's
# defaults. A from-scratch B0 + NAS-FPN teacher (batch 16, AdamW 3e-3) first paints
# every shape "square" and separates the classes later: on seed 0 at 34.5 mIoU after
# 250 steps, 66.7 after 375 and 69.5 after 500 (benchmarks/segmentation_teacher_curve.py).
# With shapes of 24-64 px and up to two distractors, seed 0's teacher stayed at 31-40
# mIoU after 400 steps with triangles at 0 IoU: 31.2 with NAS-FPN at lr 1e-3, 39.6 with
# the FPN neck at 3e-3, 34.4 with calmer textures (NAS-FPN, 3e-3); batches of 8 gave
# 31.1 after 500.
DEMO = Demo(
    presets=("demo-segmentation", "demo-segmentation-quick"),
    world=WorldSpec(object_size=(32.0, 72.0), aspect=(1.0, 1.0), rotate=False, distractors_per_image=(0, 1)),
    data=_voc_world,
)


def probabilities(
    model: Segmenter, images: list[torch.Tensor], image_size: int, scales: tuple[float, ...] = (1.0,)
) -> list[torch.Tensor]:
    """Class probabilities float32 [K,H,W] per image, in its own pixel frame (on the CPU).

    At each scale s the image's long side is resized to s * image_size and padded to a
    multiple of the model's size divisibility; the softmax maps, cropped to the image and
    resized back to its size, are averaged over the scales (the multi-scale teacher).
    """
    total: list[torch.Tensor | None] = [None] * len(images)
    for s in scales:
        long_side = max(1, round(image_size * s))
        padded = math.ceil(long_side / model.size_divisibility) * model.size_divisibility
        batch, windows = [], []
        for im in images:
            h, w = im.shape[-2:]
            factor = long_side / max(h, w)
            boxed, _ = resize(im, {}, factor) if factor != 1.0 else (im, {})
            windows.append(tuple(boxed.shape[-2:]))
            batch.append(crop_pad(boxed, {}, 0, 0, padded)[0])
        probs = model(model_input(torch.stack(batch), model)).float().softmax(1)
        for i, (im, (nh, nw)) in enumerate(zip(images, windows)):
            p = probs[i : i + 1, :, :nh, :nw]
            if (nh, nw) != tuple(im.shape[-2:]):
                p = F.interpolate(p, size=tuple(im.shape[-2:]), mode="bilinear", align_corners=False)
            p = p[0].cpu()
            total[i] = p if total[i] is None else total[i] + p
    return [t / len(scales) for t in total]


class SegmentationFamily:
    name = "segmentation"
    metric = "mIoU"
    sidecar_ext = "png"
    label_unit = "pixels"
    data_formats = {"voc": VocLayout()}
    demo = DEMO

    # ------------------------------------------------------------------ model

    def build_model(self, cfg: ModelConfig) -> Segmenter:
        if cfg.num_classes < 2:
            raise ValueError(f"model.num_classes={cfg.num_classes}: a segmenter needs background and a class")
        backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=cfg.backbone_checkpoint)
        neck = build_neck(
            cfg.neck, backbone.channels, cfg.neck_channels, num_repeats=cfg.nasfpn_repeats, separable=cfg.separable
        )
        return Segmenter(backbone, neck, cfg.num_classes, head_norm=cfg.head_norm, dropout=cfg.dropout)

    # ------------------------------------------------------------------ data

    def labeled_dataset(self, data: DataConfig, split: str, augment_level: str | Augment | None) -> VOCSegmentation:
        common = dict(size=data.image_size, num_classes=self.num_classes(data))
        if split == "train":
            return VOCSegmentation(
                data.voc_root,
                data.voc_train_split,
                augment_level,
                limit=data.labeled_limit,
                masks=data.voc_train_masks,
                **common,
            )
        if split == "val":
            return VOCSegmentation(data.voc_root, data.voc_val_split, augment_level, **common)
        if split == "holdout":
            if data.voc_holdout_split is None:
                raise ValueError("the holdout split needs data.voc_holdout_split")
            return VOCSegmentation(data.voc_root, data.voc_holdout_split, augment_level, **common)
        raise ValueError(f"unknown split {split!r}; valid: train, val, holdout")

    def class_names(self, data: DataConfig) -> list[str]:
        return list(data.voc_classes or VOC_CLASSES)

    def num_classes(self, data: DataConfig) -> int:
        return len(self.class_names(data))

    def collate(self, samples: list[tuple[torch.Tensor, dict]]) -> dict:
        """Samples of equal size -> {"images": uint8 [B,3,S,S], "masks": uint8 [B,S,S]}."""
        return {
            "images": torch.stack([s[0] for s in samples]),
            "masks": torch.stack([s[1]["mask"] for s in samples]),
        }

    # ------------------------------------------------------------------ training

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-image shares {loss_seg: [B] float32} of the parts' pixel cross-entropy.

        The human part (the first `batch["num_human"]` images, all by default) and the
        pseudo part are each divided by their own number of labeled pixels, so the mean
        over either part is that part's mean cross-entropy per pixel (`Segmenter.loss`).
        """
        logits = model(model_input(batch["images"], model))
        b = logits.shape[0]
        num_human = batch.get("num_human", b)
        return {"loss_seg": Segmenter.loss(logits, batch["masks"], group_sizes=(num_human, b - num_human))}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(
        self, model: Segmenter, images: list[torch.Tensor], image_size: int, scales: tuple[float, ...] = (1.0,)
    ) -> list[dict]:
        """{"mask": uint8 [H,W] argmax class, "score": float32 [H,W] its probability} per image.

        Eval mode whatever the module's mode (restored afterwards).
        """
        if not images:
            return []
        was_training = model.training
        model.eval()
        try:
            probs = probabilities(model, images, image_size, scales)
        finally:
            model.train(was_training)
        out = []
        for p in probs:
            score, cls = p.max(0)
            out.append({"mask": cls.to(torch.uint8), "score": score})
        return out

    def label_images(self, model: Segmenter, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig):
        """Pixel pseudo-labels (None for an image without a confident pixel), optionally multi-scale."""
        preds = self.predict(model, images, image_size, scales=rule.scales)
        return [self.to_pseudo_label(p, rule) for p in preds]

    def to_pseudo_label(self, prediction: dict, rule: PseudoLabelConfig) -> dict | None:
        return pseudo.select_pixels(prediction, rule.score_threshold)

    def encode(self, label: dict) -> bytes:
        return pseudo.encode(label)

    def decode(self, data: bytes) -> dict:
        return pseudo.decode(data)

    def label_stats(self, label: dict, num_classes: int) -> dict:
        return pseudo.stats(label, num_classes)

    def stats_rows(self, total: dict, unit: str) -> list[tuple[str, str]]:
        """The share of the kept images' pixels that carry a label (`pixels`: all of theirs)."""
        if not total.get("pixels"):
            return []
        return [(f"share of kept images' {unit} labeled", f"{100 * total['labels'] / total['pixels']:.1f}%")]

    # ------------------------------------------------------------------ audit

    audit_legend = "image | ground truth | the teacher's kept pixels (grey: left unlabeled)"
    audit_scoring = "pixel by pixel"

    def scored_labels(self, model: Segmenter, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig):
        """{"mask": argmax class, "score": its probability} per image: the rule's label at
        any threshold keeps the pixels scoring at least that threshold."""
        return self.predict(model, images, image_size, scales=rule.scales)

    def at_threshold(self, scored: dict, threshold: float) -> dict | None:
        return pseudo.select_pixels(scored, threshold)

    def audit_counts(self, scored: dict, target: dict, thresholds: list[float], num_classes: int, iou: float) -> dict:
        """Pixel counts [T][C] at each threshold: kept pixels of class c that are c in the
        ground truth (tp) or another class (fp), and ground-truth c pixels not kept as c
        (fn). Pixels the ground truth ignores (255) count nowhere; `iou` is unused."""
        return pseudo.pixel_counts(scored, target, thresholds, num_classes)

    def draw_audit(self, image: torch.Tensor, label: dict | None, target: dict, class_names: list[str]):
        return pseudo.draw_masks(image, label, target)

    # ------------------------------------------------------------------ predict

    def prediction_output(self, index: int, name: str, label: dict | None, class_names: list[str]):
        """The class map as a palette PNG (`masks/<name>.png`, VOC colours, 255 where no
        pixel reached the threshold) and a record naming it and the classes present."""
        stem = name.rsplit(".", 1)[0]
        if label is None:
            return [{"image_id": index, "file_name": name, "mask": None, "classes": []}], {}
        mask = label["mask"].cpu().to(torch.uint8)
        present = [class_names[c] for c in torch.unique(mask).tolist() if c < len(class_names)]
        path = f"masks/{stem}.png"
        record = {"image_id": index, "file_name": name, "mask": path, "classes": present}
        return [record], {path: encode_voc_png(mask.numpy())}

    def draw_prediction(self, image: torch.Tensor, label: dict | None, class_names: list[str]):
        return pseudo.overlay_mask(image, label)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(
        self,
        model: Segmenter,
        data: DataConfig,
        batch_size: int = 32,
        num_workers: int = 0,
        split: str = "val",
        results_dir: str | None = None,
    ) -> dict[str, float]:
        """mIoU, pixel accuracy and per-class IoU (percent) on `split` (val), single scale;
        with `results_dir`, each image's predicted class map as a palette PNG named after
        the image (`<id>.png`, VOC colours), as VOC's own masks are written."""
        dataset = self.labeled_dataset(data, split, None)
        names = self.class_names(data)
        if getattr(model, "num_classes", len(names)) != len(names):
            raise ValueError(f"model predicts {model.num_classes} classes, data has {len(names)}: {names}")
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=list_collate, **loader_options(num_workers))
        conf = torch.zeros(len(names), len(names), dtype=torch.int64)
        for samples in loader:
            preds = self.predict(model, [s[0] for s in samples], data.image_size)
            for (_, target), pred in zip(samples, preds):
                conf += seg_eval.confusion_matrix(pred["mask"], target["mask"], len(names))
                if results_dir is not None:
                    png = encode_voc_png(pred["mask"].cpu().to(torch.uint8).numpy())
                    atomic_write(storage.join(results_dir, f"{target['image_id']}.png"), lambda f, b=png: f.write(b))
        return seg_eval.miou(conf, names)
