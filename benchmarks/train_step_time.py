"""Seconds per training step of the demo models at 128 px, on random tensors (no data loading).

    .venv/bin/python benchmarks/train_step_time.py [--steps 4] [--reference | --backbones]

Prints one JSON object: per (family, neck, width, repeats, batch) the mean wall time of
a forward + backward + AdamW step after two warm-up steps, with torch's default
threads. Multiply by a preset's steps to see where a demo's time goes. The last case
(B0 + FPN detector, batch 16, 128 px) is the *reference step*: time budgets (the demo's
2,000 reference steps) are stated in it, because machines of one kind differ about 2x
from day to day. `--reference` measures only that case. `--backbones` measures the
detector's step (`--family segmentation`: the segmenter's) with each backbone of
`BACKBONES` (or of `--models backbone:neck ...`) instead (EfficientNet B0 and one size
larger, BiT ResNet-v2, plain ViTs under the simple pyramid), each also as a ratio to the
reference step measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from configs import ModelConfig
from engine.families import FAMILIES

CASES = [  # family, neck, channels, repeats, batch
    ("segmentation", "nasfpn", 64, 3, 16),
    ("segmentation", "nasfpn", 64, 3, 32),
    ("segmentation", "nasfpn", 32, 1, 16),
    ("detection", "fpn", 64, 1, 16),
]
REFERENCE = CASES[-1]  # the reference step of every time budget
BACKBONES = [  # backbone, neck: detector steps at the reference's batch and size
    ("tf_efficientnet_b0", "fpn"),
    ("tf_efficientnet_b1", "fpn"),
    ("resnetv2_50x1_bit", "fpn"),
    ("vit_tiny_patch16_224", "simple"),
    ("vit_small_patch16_224", "simple"),
]


def batch(family: str, n: int) -> dict:
    images = torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8)
    if family == "segmentation":
        return {"images": images, "masks": torch.randint(0, 4, (n, 128, 128), dtype=torch.uint8)}
    box = {"boxes_xyxy": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}
    return {"images": images, "targets": [box] * n}


def build(name: str, neck: str, channels: int, repeats: int, backbone: str = "tf_efficientnet_b0"):
    """(family, model) of a demo-sized model (B0 unless `backbone` says) with this neck, seeded."""
    torch.manual_seed(0)
    family = FAMILIES[name]
    cfg = ModelConfig(
        backbone=backbone,
        neck=neck,
        neck_channels=channels,
        nasfpn_repeats=repeats,
        head_norm="group",
        num_classes=4 if name == "segmentation" else 3,
    )
    return family, family.build_model(cfg)


def timed_steps(family, model, b: dict, steps: int, on_start=None) -> float:
    """Mean seconds of `steps` AdamW training steps on batch `b`, after two warm-up steps;
    `on_start()` runs when the timing starts."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for i in range(2 + steps):
        if i == 2:
            if on_start is not None:
                on_start()
            t0 = time.perf_counter()
        loss = sum(v.mean() for v in family.losses(model, b).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def step_time(
    name: str, neck: str, channels: int, repeats: int, n: int, steps: int = 4, backbone: str = "tf_efficientnet_b0"
) -> float:
    """Mean seconds of one bare training step (after two warm-up steps)."""
    family, model = build(name, neck, channels, repeats, backbone)
    return timed_steps(family, model, batch(name, n), steps)


def reference_step(steps: int = 4) -> float:
    """The reference step that time budgets are stated in: B0 + FPN detector, batch 16, 128 px."""
    return step_time("detection", "fpn", 64, 1, 16, steps)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reference", action="store_true", help="only the reference step (B0 + FPN, batch 16)")
    parser.add_argument("--backbones", action="store_true", help="the detector's step per backbone of BACKBONES")
    parser.add_argument("--family", default="detection", help="--backbones: the family whose model is timed")
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="BACKBONE:NECK", help="--backbones: these instead of BACKBONES"
    )
    args = parser.parse_args()
    if args.backbones:
        models = [tuple(m.split(":", 1)) for m in args.models] if args.models else BACKBONES
        # the demos' models: detection B0 + FPN (one level), segmentation B0 + NAS-FPN x3
        repeats = 3 if args.family == "segmentation" else 1
        ref = reference_step(args.steps)
        rows = []
        for backbone, neck in models:
            s = step_time(args.family, neck, 64, repeats, 16, args.steps, backbone)
            row = {"backbone": backbone, "neck": neck, "s_per_step": round(s, 3), "reference_steps": round(s / ref, 2)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        out = {"benchmark": "backbone_steps", "threads": torch.get_num_threads(), "reference_step_s": round(ref, 3)}
        key = "detector" if args.family == "detection" else args.family
        print(json.dumps({**out, f"{key}_batch_16_128px": rows}, indent=1))
        return 0
    rows = []
    for name, neck, channels, repeats, n in [REFERENCE] if args.reference else CASES:
        s = step_time(name, neck, channels, repeats, n, args.steps)
        rows.append(
            {
                "family": name,
                "neck": neck,
                "channels": channels,
                "repeats": repeats,
                "batch": n,
                "s_per_step": round(s, 3),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "train_step_time", "threads": torch.get_num_threads(), "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
