"""`shards build` throughput: images/s on a folder of ImageNet-sized JPEGs, one thread against every core.

    .venv/bin/python benchmarks/shards_build.py [--images 1000] [--workers 1 2] [--out runs/shards-build]

Writes `--images` JPEGs of ImageNet's typical size (500 x 375, quality 90: shapes over a
gradient with a film grain: about 70 KB each, where ImageNet's average about 110 KB) into
a folder once, then times `data.shards.build_shards_from_folder` on it for each worker
count (each builds its own shards; the page cache is warm for all of them, so reading
is not what is measured). Prints one JSON object: per worker count the wall time and
images/s, and the speed-up over the first count. The reference step
(benchmarks/train_step_time.py) is measured before, so the figures convert across
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder (demo_seeds)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data.shards import build_shards_from_folder  # noqa: E402

SIZE = (500, 375)  # width, height: the most common ImageNet training image


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 1, SIZE[0])[None, :, None]
    y = np.linspace(0, 1, SIZE[1])[:, None, None]
    for i in range(n):
        base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, SIZE[0] - 60), rng.integers(0, SIZE[1] - 60)
            w, h = rng.integers(20, 160, 2)
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        grain = rng.normal(0, 12, (SIZE[1], SIZE[0], 3))  # texture, so that files compress as photographs do
        im = Image.fromarray(np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")
        im.save(folder / f"n{i % 10:08d}_{i:06d}.JPEG", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--out", default="runs/shards-build")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    folder = out / "images"
    if len(list(folder.glob("*.JPEG"))) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        write_images(folder, args.images)
    reference = None
    if not args.no_reference:
        from demo_seeds import measure_reference

        reference = measure_reference()
    build_shards_from_folder(folder, out / "warm", per_shard=100, workers=1)  # the page cache, once
    rows = []
    for workers in args.workers:
        t0 = time.perf_counter()
        report = build_shards_from_folder(folder, out / f"shards-{workers}", per_shard=100, workers=workers)
        wall = time.perf_counter() - t0
        assert report["images"] == args.images, report
        rows.append({"workers": workers, "wall_s": round(wall, 2), "images_per_s": round(args.images / wall, 1)})
    for row in rows:
        row["speedup"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
    result = {
        "benchmark": "shards_build",
        "images": args.images,
        "image_size": list(SIZE),
        "mean_file_kb": round(sum(p.stat().st_size for p in folder.glob("*.JPEG")) / args.images / 1024, 1),
        "cpu_count": os.cpu_count(),
        "runs": rows,
        "reference_step_s": reference,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
