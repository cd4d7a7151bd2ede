"""Is the demo's teacher near its plateau? The same teacher trained for more (or fewer) steps.

    .venv/bin/python benchmarks/teacher_plateau.py --run runs/bench-det/seed-0/run \
        [--factors 1.25] [--out runs/plateau-det] [--plot docs/img/teacher-plateau-detection.png]

Reads a finished demo run (its `config.yaml` and its round-0 teacher) and trains, for
each factor f, the same teacher (same data, seed, recipe, warm-up) for round(f * steps)
steps with its own cosine schedule, through the product's `stage teacher` in a fresh
process per point. Each point is evaluated on val and on the held-out split
(`engine.training.evaluate_checkpoint`); the run's own teacher is the 1x point. Prints one
JSON object: per point steps, val and held-out metric, wall time and reference steps
(benchmarks/train_step_time.py, measured before the first point), and each point's
gain over the 1x teacher and over the point before it. The demo's teacher counts as near
its plateau (`near_plateau`) when the 1.25x teacher gains under 1.0 on both splits and no
longer point measured gains 1.0 or more over it. Factors in steps of 1.25 (`--factors
1.25 1.5625 1.953125`) give the curve further out: `plateau_steps` is the first point
near its plateau by the same rule (null if none is).

`--set KEY=VALUE` (repeatable) changes the teacher's recipe for every point, for instance
a faster schedule (`--set teacher.lr=0.006 --set teacher.steps=900`); the 1x point is then
trained too, in `<out>/steps-N` like the others, instead of read from the run.

Resumable: a point whose teacher finished is evaluated again, not retrained (its
recorded wall time is kept); a finished point trained with other `--set` values is an
error that names both, not a silent reuse. Cost: the teacher's time times the sum of
the factors (plus 1 with `--set`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder when imported

from demo_seeds import measure_reference  # noqa: E402

from configs import load_config  # noqa: E402
from engine.families import has_holdout  # noqa: E402
from engine.training import MODEL_FILE, evaluate_checkpoint  # noqa: E402


def point(cfg, checkpoint: Path, metric: str) -> dict:
    """Val and held-out metric of one teacher checkpoint."""
    out = {"val": round(evaluate_checkpoint(cfg, checkpoint, "val")[metric], 2)}
    if has_holdout(cfg):
        out["held_out"] = round(evaluate_checkpoint(cfg, checkpoint, "holdout")[metric], 2)
    return out


BAR = 1.0  # a teacher trained 25% longer gains under this much: near its plateau


def flat_from(points: list[dict], i: int) -> bool:
    """Is points[i] near its plateau: a later point has 1.25x its steps (within one step),
    and no later point gains BAR or more over it on a split both measured? Every later
    point counts, not only the 1.25x one, because one teacher's metric moves by a point or
    two between schedules: a 1.25x point that dips is no plateau when a longer one climbs
    past it."""
    here, later = points[i], points[i + 1 :]
    if not any(abs(p["steps"] - 1.25 * here["steps"]) <= 1 for p in later):
        return False
    gains = [p[s] - here[s] for p in later for s in ("val", "held_out") if s in here and s in p]
    return bool(gains) and max(gains) < BAR


def curve(points: list[dict]) -> int | None:
    """Add each point's gain over the point before it (`<split>_over_previous`), in place;
    return the steps of the first point near its plateau (`flat_from`), or None."""
    for before, after in zip(points, points[1:]):
        for split in ("val", "held_out"):
            if split in before and split in after:
                after[f"{split}_over_previous"] = round(after[split] - before[split], 2)
    return next((p["steps"] for i, p in enumerate(points) if flat_from(points, i)), None)


def plot(result: dict, path: Path) -> None:
    """The curve: val and held-out metric against teacher steps, each point marked with
    its gain over the point before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for split, colour in (("val", "tab:blue"), ("held_out", "tab:orange")):
        ps = [p for p in points if split in p]
        ax.plot([p["steps"] for p in ps], [p[split] for p in ps], "o-", color=colour, label=split.replace("_", "-"))
        for p in ps:
            if f"{split}_over_previous" in p:
                ax.annotate(
                    f"{p[f'{split}_over_previous']:+.2f}",
                    (p["steps"], p[split]),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                    color=colour,
                )
    if result.get("plateau_steps"):
        ax.axvline(result["plateau_steps"], color="gray", ls="--", lw=1, label="plateau: no longer point gains 1.0")
    ax.margins(x=0.08, y=0.15)  # room for the labels above the end points
    sets = ", ".join(result.get("sets") or []) or "the run's recipe"
    ax.set_xlabel("teacher steps (each with its own cosine schedule)")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{result['family']} teacher, {sets}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished demo run directory (holds config.yaml)")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.25])
    parser.add_argument("--out", default=None, help="default: <run>/../plateau")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the curve there")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="the teacher's recipe, every point"
    )
    args = parser.parse_args()
    run = Path(args.run)
    config = run / "config.yaml"
    if not config.exists():
        raise SystemExit(f"--run {run}: no config.yaml; give a finished demo run directory")
    cfg = load_config(config, args.sets)
    metric = json.loads((run / "summary.json").read_text())["metric"]
    base_ckpt = run / "round-0" / "teacher" / MODEL_FILE
    if not base_ckpt.exists():
        raise SystemExit(f"--run {run}: its round-0 teacher has not finished ({base_ckpt} is missing)")
    out_root = Path(args.out) if args.out else run.parent / "plateau"
    ref = None if args.no_reference else measure_reference()
    base = cfg.teacher.steps
    points = []
    factors = list(args.factors)
    if args.sets:
        factors = [1.0, *(f for f in factors if f != 1.0)]
    else:
        points.append({"factor": 1.0, "steps": base, **point(cfg, base_ckpt, metric)})
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    for factor in factors:
        steps = round(factor * base)
        cell = out_root / f"steps-{steps}"
        ckpt = cell / "run" / "round-0" / "teacher" / MODEL_FILE
        overrides = [*args.sets, f"out_dir={cell / 'run'}", f"teacher.steps={steps}"]
        wall_file = cell / "wall.json"
        if ckpt.exists() and wall_file.exists():
            before = json.loads(wall_file.read_text()).get("sets", [])
            if before != args.sets:
                raise SystemExit(
                    f"{cell} holds a teacher trained with --set {before or 'nothing'}, not {args.sets or 'nothing'}; "
                    "give another --out"
                )
        else:
            cell.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "flows.cli", "stage", "teacher", str(config)]
            for o in overrides:
                cmd += ["--set", o]
            t0 = time.perf_counter()
            with open(cell / "stage.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                raise SystemExit(f"the {steps}-step teacher failed (exit {rc}); see {cell / 'stage.log'}")
            wall = {"wall_s": round(time.perf_counter() - t0, 1), "reference_step_s": ref, "sets": args.sets}
            wall_file.write_text(json.dumps(wall) + "\n")
        wall = json.loads(wall_file.read_text())
        row = {"factor": factor, "steps": steps, **point(load_config(config, overrides), ckpt, metric)}
        row["wall_s"] = wall["wall_s"]
        if wall.get("reference_step_s"):
            row["reference_steps"] = round(wall["wall_s"] / wall["reference_step_s"])
        if points:
            for split in ("val", "held_out"):
                if split in row:
                    row[f"{split}_gain"] = round(row[split] - points[0][split], 2)
        points.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    points.sort(key=lambda p: p["steps"])
    plateau = curve(points)
    base_at = next(i for i, p in enumerate(points) if p["factor"] == 1.0)
    near = flat_from(points, base_at) if any(p["factor"] == 1.25 for p in points) else None  # None: not measured
    result = {
        "benchmark": "teacher_plateau",
        "run": str(run),
        "family": cfg.family,
        "metric": metric,
        "sets": args.sets,
        "points": points,
        "near_plateau": near,
        "plateau_steps": plateau,
        "reference_step_s": ref,
    }
    if args.plot:
        plot(result, Path(args.plot))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
