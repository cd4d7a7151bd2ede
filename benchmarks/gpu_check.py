"""The production model on a CUDA device: B7 RetinaNet at 640 px against its bare limits,
in bf16 and in fp32, and what that means for a pool of images. One JSON object.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--gpus 8] [--images 1700000] \
        [--steps 10] [--out runs/gpu-check]

For each precision it runs `benchmarks/ratios.py` in a fresh process with the COCO
preset's model (configs/coco-retinanet-b7.yaml: tf_efficientnet_b7, FPN of 256
channels, BatchNorm head, anchor scale 4) at 640 px, channels_last, pinned batches
copied ahead, cuDNN's kernel search, and GPU-sized batches: 16 per training step
(student 16 + 16), 64 per labeling forward, 8 decode threads, 8 loader workers. It
reports, per precision, the labeling, teacher and student img/s, their ratios to the
bare figures, and the device's peak memory in each.

The capacity line divides `--images` by the bf16 labeling rate on `--gpus` GPUs (one
labeling process per GPU, which scales linearly: shards are independent). The images are
the embedded world's, letterboxed to 640 px: a real 640 px JPEG costs more to decode
(about 200-400 images/s per core), which the decode threads and loader workers absorb on a
machine with 8 or more cores per GPU.

`--device cpu --quick` runs the same script with the quick demo's toy model: it checks the
script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RATIOS = Path(__file__).with_name("ratios.py")
B7 = [
    "model.backbone=tf_efficientnet_b7",
    "model.neck=fpn",
    "model.neck_channels=256",
    "model.head_norm=batch",
    "model.anchor_scale=4.0",
    "data.image_size=640",
    "data.num_workers=8",
    "teacher.batch_size=16",
    "student.train.batch_size=16",
    "pseudo.batch_size=64",
    "pseudo.decode_threads=8",
    "teacher.channels_last=true",
    "student.train.channels_last=true",
]


def run_ratios(args, precision: str) -> dict:
    overrides = [] if args.quick else list(B7)
    overrides += [f"teacher.amp={precision}", f"student.train.amp={precision}", f"pseudo.amp={precision}"]
    cmd = [sys.executable, str(RATIOS), "--device", args.device, "--steps", str(args.steps), "--warmup", "3"]
    cmd += ["--out", str(Path(args.out) / precision), "--shards", "4", "--per-shard", str(args.per_shard)]
    cmd += ["--quick"] if args.quick else []
    cmd += [f"--set={o}" for o in overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ratios.py failed for {precision} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])


def summary(r: dict) -> dict:
    return {
        "labeling_img_s": r["labeling"]["pipeline_img_s"],
        "labeling_ratio": r["labeling"]["ratio"],
        "labeling_peak_gib": r["labeling"]["device_peak_gib"],
        "teacher_img_s": r["teacher"]["img_s"],
        "teacher_ratio": r["teacher"]["ratio"],
        "teacher_peak_gib": r["teacher"]["device_peak_gib"],
        "student_img_s": r["student"]["img_s"],
        "student_ratio": r["student"]["ratio"],
        "student_peak_gib": r["student"]["device_peak_gib"],
    }


def capacity_line(images: int, gpus: int, img_s: float) -> str:
    hours = images / (img_s * gpus) / 3600
    return f"{images / 1e6:.1f}M images on {gpus} GPU{'s' if gpus != 1 else ''}: {hours:.1f} hours of labeling"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--images", type=int, default=1_700_000, help="unlabeled images to plan for")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--quick", action="store_true", help="the quick demo's toy model (a check of the script)")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    results = {precision: run_ratios(args, precision) for precision in ("bf16", "off")}
    out = {
        "benchmark": "gpu_check",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "quick": args.quick,
        "bf16": summary(results["bf16"]),
        "fp32": summary(results["off"]),
    }
    out["capacity"] = capacity_line(args.images, args.gpus, out["bf16"]["labeling_img_s"])
    print(json.dumps(out, indent=2))
    print(out["capacity"])
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
