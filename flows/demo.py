"""The demo: one Noisy Student round on the embedded synthetic world.

`noisy-student demo` generates the world (once; it is cached under <out>/world),
runs `noisy_student_flow` with the `demo` preset and prints teacher vs student.
`--quick` uses a tiny model on a few images (about a minute; the test suite runs it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from configs import RunConfig, build_config, merge, resolve_preset
from data.world import WorldSpec, write_world

# World sizes per preset: labeled train / val / unlabeled pool, images per shard.
WORLDS = {
    "demo": dict(n_train=200, n_val=200, n_unlabeled=2000, per_shard=250),
    "demo-quick": dict(n_train=16, n_val=16, n_unlabeled=48, per_shard=16),
}


def demo_config(
    out: str | Path, seed: int = 0, quick: bool = False, device: str = "cpu", overrides: list[str] | None = None
) -> tuple[RunConfig, dict]:
    """Write the world under <out>/world and return the run's config and world facts."""
    preset = "demo-quick" if quick else "demo"
    out = Path(out)
    world = write_world(out / "world", WorldSpec(), seed=seed, **WORLDS[preset])
    raw = yaml.safe_load(resolve_preset(preset).read_text())
    raw = merge(
        raw,
        {
            "out_dir": str(out / "run"),
            "device": device,
            "data": {
                "format": "coco",
                "train_images": str(world.images_dir),
                "train_annotations": str(world.train_annotations),
                "val_images": str(world.images_dir),
                "val_annotations": str(world.val_annotations),
                "unlabeled_shards": str(world.unlabeled_pattern),
            },
            "model": {"num_classes": world.num_classes},
            "teacher": {"seed": seed},
            "student": {"train": {"seed": seed}},
        },
    )
    return build_config(raw, overrides), {"classes": list(world.class_names), **WORLDS[preset]}


def format_summary(summary: dict, title: str) -> str:
    metric = summary["metric"]
    lines = [title, f"{'round':>5}  {'teacher ' + metric:>11}  {'student ' + metric:>11}  {'gain':>6}  pseudo-labels"]
    for r in summary["rounds"]:
        t, s = r["teacher_metrics"][metric], r["student_metrics"][metric]
        p = r["pseudo"]
        lines.append(
            f"{r['round']:>5}  {t:>11.2f}  {s:>11.2f}  {s - t:>+6.2f}  "
            f"{p['kept']}/{p['images']} images kept, {p['labels']} labels"
        )
    lines.append(f"elapsed {summary['elapsed_s']:.0f} s; run directory {summary['run_dir']}")
    return "\n".join(lines)
