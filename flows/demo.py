"""The demo: one Noisy Student round on the embedded synthetic world.

`noisy-student demo` generates the world (once; it is cached under <out>/world),
runs `noisy_student_flow` with the `demo` preset and prints teacher vs student.
`--quick` uses a tiny model on a few images (about a minute; the test suite runs it).
`--family segmentation` runs the same flow on the world's VOC layout (class maps).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from configs import RunConfig, build_config, merge, resolve_preset
from data import storage
from data.world import WorldSpec, write_world

# World sizes: labeled train / val / unlabeled pool, images per shard.
WORLDS = {
    "full": dict(n_train=200, n_val=200, n_unlabeled=2000, per_shard=250),
    "quick": dict(n_train=16, n_val=16, n_unlabeled=48, per_shard=16),
}
FAMILY_NAMES = ("detection", "segmentation")
# The world per family. Detection's is easier than the renderer's defaults, so that a
# from-scratch B0 teacher on 200 labeled images reaches the paper's regime (30+ AP)
# within the demo's budget: upright shapes of near-unit aspect, at most one distractor
# (occlusion stays: 1-4 objects per scene in random draw order), calmer textures
# (background contrast 10-50, noise 8) and a higher colour-contrast floor (60).
# Segmentation tells shapes apart pixel by pixel from stride-8 features, so its world
# draws larger shapes (32-72 px: a 32 px triangle is four P3 cells wide), upright and
# unstretched, with at most one distractor; its textures keep the renderer's defaults.
# A from-scratch B0 + NAS-FPN teacher (batch 16, AdamW 3e-3) first paints every shape
# "square" and separates the classes later: on seed 0 at 34.5 mIoU after 250 steps, 66.7
# after 375 and 69.5 after 500 (benchmarks/segmentation_teacher_curve.py). With shapes of
# 24-64 px and up to two distractors, seed 0's teacher stayed at 31-40 mIoU after 400
# steps with triangles at 0 IoU: 31.2 with NAS-FPN at lr 1e-3, 39.6 with the FPN neck at
# 3e-3, 34.4 with calmer textures (NAS-FPN, 3e-3); batches of 8 gave 31.1 after 500.
WORLD_SPECS = {
    "detection": WorldSpec(
        object_size=(20.0, 60.0),
        aspect=(0.75, 1.33),
        rotate=False,
        distractors_per_image=(0, 1),
        background_contrast=(10.0, 50.0),
        noise_std=8.0,
        min_contrast=60.0,
    ),
    "segmentation": WorldSpec(object_size=(32.0, 72.0), aspect=(1.0, 1.0), rotate=False, distractors_per_image=(0, 1)),
}


def demo_preset(family: str = "detection", quick: bool = False) -> str:
    """Preset name of the demo: demo, demo-quick, demo-segmentation, demo-segmentation-quick."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILY_NAMES)}")
    name = "demo" if family == "detection" else f"demo-{family}"
    return f"{name}-quick" if quick else name


def _world_data(family: str, world) -> tuple[dict, int]:
    """The data section pointing at the world, and the model's class count."""
    if family == "segmentation":
        data = {
            "format": "voc",
            "voc_root": str(world.voc_root),
            "voc_classes": ["background", *world.class_names],
        }
        return data, world.num_classes + 1
    data = {
        "format": "coco",
        "train_images": str(world.images_dir),
        "train_annotations": str(world.train_annotations),
        "val_images": str(world.images_dir),
        "val_annotations": str(world.val_annotations),
    }
    return data, world.num_classes


def demo_config(
    out: str | Path,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    overrides: list[str] | None = None,
    family: str = "detection",
    world_dir: str | Path | None = None,
    sizes: dict | None = None,
) -> tuple[RunConfig, dict]:
    """Write the world under `world_dir` (default <out>/world) and return the run's config
    and world facts. `sizes` replaces some of the world's counts (n_train, n_val,
    n_unlabeled, per_shard); several runs can share one world directory."""
    preset = demo_preset(family, quick)
    sizes = {**WORLDS["quick" if quick else "full"], **(sizes or {})}
    unknown = set(sizes) - set(WORLDS["full"])
    if unknown:
        raise ValueError(f"unknown world sizes {sorted(unknown)}; valid: {', '.join(WORLDS['full'])}")
    out = storage.path(out)
    world = write_world(world_dir if world_dir else out / "world", WORLD_SPECS[family], seed=seed, **sizes)
    data, num_classes = _world_data(family, world)
    raw = yaml.safe_load(resolve_preset(preset).read_text())
    raw = merge(
        raw,
        {
            "out_dir": str(out / "run"),
            "device": device,
            "data": {**data, "unlabeled_shards": str(world.unlabeled_pattern)},
            "model": {"num_classes": num_classes},
            "teacher": {"seed": seed},
            "student": {"train": {"seed": seed}},
        },
    )
    return build_config(raw, overrides), {"classes": list(world.class_names), **sizes}


def format_summary(summary: dict, title: str) -> str:
    from tasks.families import get_family

    metric, unit = summary["metric"], get_family(summary["family"]).label_unit
    lines = [title, f"{'round':>5}  {'teacher ' + metric:>11}  {'student ' + metric:>11}  {'gain':>6}  pseudo-labels"]
    for r in summary["rounds"]:
        t, s = r["teacher_metrics"][metric], r["student_metrics"][metric]
        p = r["pseudo"]
        lines.append(
            f"{r['round']:>5}  {t:>11.2f}  {s:>11.2f}  {s - t:>+6.2f}  "
            f"{p['kept']}/{p['images']} images kept, {p['labels']} {unit}"
        )
    lines.append(f"elapsed {summary['elapsed_s']:.0f} s; run directory {summary['run_dir']}")
    return "\n".join(lines)
