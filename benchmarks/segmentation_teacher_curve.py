"""How fast a segmentation teacher learns the embedded world: val mIoU per class along training.

    .venv/bin/python benchmarks/segmentation_teacher_curve.py --voc-root runs/demo-segmentation/world \
        [--steps 400] [--batch 16] [--lr 3e-3] [--head-norm group] [--neck nasfpn] [--every 50]
    .venv/bin/python benchmarks/segmentation_teacher_curve.py --voc-root ... --fixed 8 --steps 100

Trains the demo's B0 segmenter with the training engine's optimizer and schedule (AdamW,
linear warm-up, cosine) on the world's VOC layout and prints one JSON line every
`--every` steps: smoothed training loss, val mIoU and per-class IoU, and the share of
val pixels whose max probability passes `--threshold` split by predicted class (what the
pixel pseudo-label rule would keep). `--fixed N` trains on the first N train images
without augmentation and evaluates on those same images: a memorization check.

Write a world first, e.g. `noisy-student demo --family segmentation` (it caches the
world under runs/demo-segmentation/world) or `data.world.write_world`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch.utils.data import DataLoader

from configs import DataConfig, ModelConfig, TrainConfig
from engine.families import get_family
from engine.loop import build_optimizer, lr_factor
from segmentation import evaluate as seg_eval


def measure(family, model, samples, names: list[str], image_size: int, threshold: float) -> dict:
    """mIoU, per-class IoU and the confident-pixel share per predicted class on `samples`."""
    conf = torch.zeros(len(names), len(names), dtype=torch.int64)
    kept = torch.zeros(len(names), dtype=torch.int64)
    pixels = 0
    for start in range(0, len(samples), 50):
        chunk = samples[start : start + 50]
        preds = family.predict(model, [s[0] for s in chunk], image_size)
        for (_, target), pred in zip(chunk, preds):
            conf += seg_eval.confusion_matrix(pred["mask"], target["mask"], len(names))
            sure = pred["score"] >= threshold
            kept += torch.bincount(pred["mask"][sure].long(), minlength=len(names))
            pixels += pred["mask"].numel()
    out = {k: round(v, 1) for k, v in seg_eval.miou(conf, names).items()}
    out["confident_share"] = {n: round(100 * int(k) / pixels, 2) for n, k in zip(names, kept)}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--voc-root", required=True)
    p.add_argument("--classes", nargs="+", default=["background", "circle", "square", "triangle"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--neck", default="nasfpn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--head-norm", default="group", choices=["none", "batch", "group"])
    p.add_argument("--augment", default="S1", help="S1-S4, or none")
    p.add_argument(
        "--fixed", type=int, default=0, help="train and evaluate on the first N train images, no augmentation"
    )
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    family = get_family("segmentation")
    data = DataConfig(format="voc", voc_root=args.voc_root, voc_classes=args.classes, image_size=128)
    model = family.build_model(
        ModelConfig(
            backbone="tf_efficientnet_b0",
            neck=args.neck,
            nasfpn_repeats=args.repeats,
            neck_channels=args.channels,
            head_norm=args.head_norm,
            num_classes=len(args.classes),
        )
    )
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup)
    optimizer = build_optimizer(model, tcfg)
    if args.fixed:
        train = family.labeled_dataset(data, "train", None)
        samples = [train[i] for i in range(args.fixed)]
        fixed = family.collate(samples)
        batches = itertools.repeat(fixed)
        eval_samples = samples
    else:
        train = family.labeled_dataset(data, "train", None if args.augment == "none" else args.augment)
        loader = DataLoader(train, batch_size=args.batch, shuffle=True, collate_fn=family.collate, drop_last=True)
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        val = family.labeled_dataset(data, "val", None)
        eval_samples = [val[i] for i in range(len(val))]

    start, smoothed = time.perf_counter(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, tcfg)
        model.train()
        loss = family.losses(model, next(batches))["loss_seg"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "seconds": round(time.perf_counter() - start), "loss": round(smoothed, 4)}
            row.update(measure(family, model, eval_samples, args.classes, 128, args.threshold))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
