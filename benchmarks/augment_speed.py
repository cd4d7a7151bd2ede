"""Augmentation throughput per level, one core (torch.set_num_threads(1)).

    python benchmarks/augment_speed.py [--seconds S] [--seed N]

Prints one JSON object: images/s of `data.augment.apply_level` for each level (none,
S1-S4) at 640 px and at 128 px (the demo size), on synthetic samples: a 4:3 image of
noise and blobs with the long side equal to the target size, about 5 boxes with labels
and scores, and a segmentation mask (so every op moves boxes and mask together). Each
(level, size) cell runs for about `--seconds` (at least a few images, at most
`max_images`), after a few warm-up calls; total runtime stays well under 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.augment import LEVELS, apply_level  # noqa: E402

SIZES = (640, 128)
MAX_IMAGES = {640: 200, 128: 600}


def synthetic_sample(size: int, seed: int, n_boxes: int = 5) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    h, w = size * 3 // 4, size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    boxes = []
    for i in range(n_boxes):
        bw, bh = [int(v) for v in (torch.rand(2, generator=g) * torch.tensor([w / 3, h / 3]) + size / 16)]
        x0 = int(torch.randint(0, w - bw, (), generator=g))
        y0 = int(torch.randint(0, h - bh, (), generator=g))
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        mask[y0 : y0 + bh, x0 : x0 + bw] = 1 + i % 20
        image[:, y0 : y0 + bh, x0 : x0 + bw] //= 2
    mask[:2] = 255  # a strip of ignore
    target = {
        "boxes_xyxy": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.arange(n_boxes) % 20,
        "scores": torch.rand(n_boxes, generator=g),
        "mask": mask,
    }
    return image, target


def measure(level: str, size: int, seconds: float, seed: int) -> dict:
    samples = [synthetic_sample(size, seed + k) for k in range(8)]
    g = torch.Generator().manual_seed(seed)
    for k in range(3):  # warm-up
        apply_level(*samples[k], level, size, generator=g)
    n, t0 = 0, time.perf_counter()
    while n < MAX_IMAGES[size] and (n < 5 or time.perf_counter() - t0 < seconds):
        apply_level(*samples[n % len(samples)], level, size, generator=g)
        n += 1
    dt = time.perf_counter() - t0
    return {"images_per_s": round(n / dt, 1), "images": n, "seconds": round(dt, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="time per (level, size) cell")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {str(size): {level: measure(level, size, args.seconds, args.seed) for level in LEVELS} for size in SIZES}
    report = {
        "benchmark": "augment_speed",
        "unit": "images/s on one core (torch.set_num_threads(1))",
        "images_per_s": {size: {lv: r["images_per_s"] for lv, r in cells.items()} for size, cells in results.items()},
        "detail": results,
        "sample": "4:3 image, long side = size; 5 boxes with labels and scores; uint8 mask",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
