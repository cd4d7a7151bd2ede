"""The demo: one Noisy Student round on the embedded synthetic world.

`noisy-student demo` generates the world (once; it is cached under <out>/world),
runs `noisy_student_flow` with the `demo` preset and prints teacher vs student.
`--quick` uses a tiny model on a few images (about a minute; the test suite runs it).
`--family segmentation` runs the same flow on the world's VOC layout (class maps): each
family brings its demo (presets, world, data section; engine/contract.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from configs import ConfigError, RunConfig, build_config, merge, resolve_preset
from data import storage
from data.world import Demo, write_world

# World sizes: labeled train / val / unlabeled pool, images per shard.
WORLDS = {
    "full": dict(n_train=200, n_val=200, n_holdout=100, n_unlabeled=2000, per_shard=250),
    "quick": dict(n_train=16, n_val=16, n_holdout=8, n_unlabeled=48, per_shard=16),
}


def demo_of(family: str | None = None) -> Demo:
    """The demo a family brings (engine/contract.py), of the config's default family when
    None; a ConfigError naming the families that have one."""
    from engine.families import FAMILIES

    family = family or RunConfig.model_fields["family"].default
    demos = {name: f.demo for name, f in FAMILIES.items() if f.demo is not None}
    if family not in demos:
        raise ConfigError(f"no demo for family {family!r}; families with a demo: {', '.join(sorted(demos))}")
    return demos[family]


def demo_preset(family: str | None = None, quick: bool = False) -> str:
    """Preset name of a family's demo (demo, demo-quick, demo-segmentation, ...)."""
    return demo_of(family).preset(quick)


def demo_config(
    out: str | Path,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    overrides: list[str] | None = None,
    family: str | None = None,
    world_dir: str | Path | None = None,
    sizes: dict | None = None,
) -> tuple[RunConfig, dict]:
    """Write the world under `world_dir` (default <out>/world) and return the run's config
    and world facts. `sizes` replaces some of the world's counts (n_train, n_val,
    n_unlabeled, per_shard); several runs can share one world directory."""
    demo = demo_of(family)
    preset = demo.preset(quick)
    sizes = {**WORLDS["quick" if quick else "full"], **(sizes or {})}
    unknown = set(sizes) - set(WORLDS["full"])
    if unknown:
        raise ValueError(f"unknown world sizes {sorted(unknown)}; valid: {', '.join(WORLDS['full'])}")
    out = storage.path(out)
    world = write_world(world_dir if world_dir else out / "world", demo.world, seed=seed, **sizes)
    data, num_classes = demo.data(world)
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


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_summary(summary: dict, title: str) -> str:
    from engine.families import get_family
    from flows.artifacts import round_metrics

    metric, unit = summary["metric"], get_family(summary["family"]).label_unit
    lines = [
        title,
        f"{'round':>5}  {'teacher':>8}  {'control':>8}  {'student':>8}  {'s - t':>6}  {'s - c':>6}  pseudo-labels"
        f"   ({metric}; control: the student's recipe on human labels only)",
    ]
    for r in summary["rounds"]:
        m = round_metrics(r, metric)
        p = r["pseudo"]
        lines.append(
            f"{r['round']:>5}  {m['teacher']:>8}  {m['control']:>8}  {m['student']:>8}  {m['student - teacher']:>6}  "
            f"{m['student - control']:>6}  {p['kept']}/{p['images']} images kept, {p['labels']} {unit}"
        )
        if a := r.get("audit"):
            d = a["at_drawn"]
            lines.append(
                f"       audit: labels at {d['threshold']:g} have precision {_pct(d['precision'])}, recall "
                f"{_pct(d['recall'])} on held-out images; F1 is highest at {a['f1_threshold']:g}"
            )
        if soup := r.get("soup"):
            best = max(soup["ingredients"], key=lambda i: i["val"])
            lines.append(
                f"       soups ({metric} on val): uniform {soup['soups']['uniform']['val']:.2f}, greedy "
                f"{soup['soups']['greedy']['val']:.2f} ({' + '.join(soup['soups']['greedy']['ingredients'])}), "
                f"best ingredient {best['val']:.2f} ({best['name']})"
                + (f"; control {m['control']}" if "control_metrics" in r else "")
            )
    lines.append(f"elapsed {summary['elapsed_s']:.0f} s; run directory {summary['run_dir']}")
    return "\n".join(lines)
