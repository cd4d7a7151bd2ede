"""Student recipes on the same teachers: which student side lifts student - control?

    .venv/bin/python benchmarks/student_recipes.py \
        --runs runs/bench-seg-preset/seed-0/run runs/bench-seg-preset/seed-1/run \
        --recipe alpha-2 student.alpha=2 \
        --recipe scales-4 'pseudo.scales=[0.75,1.0,1.25,1.5]' \
        [--out runs/student-recipes] [--no-reference]

For each finished demo run (its `config.yaml`, with the control on) and each recipe
(a name, then its `KEY=VALUE` settings), a copy of the run directory gets the recipe's
settings and goes through the product's whole flow (`noisy-student run`). The stage
manifests decide what runs again: the teacher never (a recipe that would change the
teacher's inputs is refused before anything runs: this compares students of one
teacher), the audit and the pseudo-labels only when the recipe changes the labeling
rule, the control only when it changes the student's training (a pseudo-only setting
such as `student.alpha` leaves it valid), and the student always. The copy is a real
one, not links: a stage that runs again rewrites its folder, and the source run stays
as it was.

Prints one JSON object: per recipe and run the teacher, control and student metric,
student - control and student - teacher on val and on the held-out split, the stages
that ran again, their wall time and reference steps (benchmarks/train_step_time.py,
measured before the first cell); then each recipe's means. The runs' own figures, with
the recipe they were run with, are the `source` recipe. Settings are chosen on
`held_out_over_control`, never on val.

Resumable: a finished cell (summary.json and wall.json) is read back, not run again; a
finished cell of the same name with other settings is an error that names both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder when imported

from demo_seeds import machine, measure_reference, seed_row  # noqa: E402

from configs import ConfigError, load_config  # noqa: E402
from engine.rundir import json_digest, read_manifest  # noqa: E402
from flows.stages import teacher_inputs  # noqa: E402

STAGES = ("teacher", "audit", "pseudo", "student", "control")
SOURCE = "source"  # the runs as they are


def parse_recipe(words: list[str]) -> tuple[str, list[str]]:
    """`NAME KEY=VALUE ...` -> (name, settings); the name is a folder name, not a setting."""
    name, *sets = words
    if "=" in name or "/" in name or name in ("", SOURCE):
        raise SystemExit(f"--recipe {' '.join(words)}: the first word names the recipe (not {name!r})")
    if not sets:
        raise SystemExit(f"--recipe {name}: give at least one KEY=VALUE setting")
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise SystemExit(f"--recipe {name}: settings are KEY=VALUE, got {bad}")
    return name, sets


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings by their dotted path."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out |= flat(value, path + ".") if isinstance(value, dict) else {path: value}
    return out


def check_teacher(run: Path, name: str, sets: list[str]) -> None:
    """Refuse, before anything runs, a recipe under which `run`'s teacher would train again:
    the teacher inputs of the run's config with the recipe applied must be the ones its
    teacher manifest recorded. Settings that only change how a stage runs (workers,
    logging) pass; a mistyped key fails here, with the config's own error."""
    recorded = read_manifest(run / "round-0" / "teacher")
    if recorded is None:
        raise SystemExit(f"--runs {run}: its teacher has not finished (no round-0/teacher/manifest.json)")
    try:
        inputs = teacher_inputs(load_config(run / "config.yaml", sets))
    except ConfigError as e:
        raise SystemExit(f"--recipe {name}: {e}") from None
    if json_digest(inputs) != recorded["inputs_digest"]:
        # named as the config names them: the teacher's training settings are `teacher.*`
        before, after = (
            {"teacher" if k == "train" else k: v for k, v in i.items()} for i in (recorded["inputs"], inputs)
        )
        before, after = flat(before), flat(after)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        raise SystemExit(
            f"--recipe {name}: {sets} would change the teacher of {run} (its {', '.join(changed)}); "
            "this compares students of one teacher"
        )


def manifests(run: Path) -> dict[str, str]:
    """The text of each round-0 stage manifest of a run directory (absent stages left out)."""
    out = {}
    for stage in STAGES:
        path = run / "round-0" / stage / "manifest.json"
        if path.exists():
            out[stage] = path.read_text()
    return out


def reran(source: dict[str, str], cell: dict[str, str]) -> list[str]:
    """The stages whose manifest differs from the source run's: the ones that ran again."""
    return [s for s in STAGES if s in cell and cell[s] != source.get(s)]


def copy_run(src: Path, dst: Path) -> None:
    """A real copy of a finished run directory, whole or not at all."""
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("run.lock", "summary.json", "report.md"))
    tmp.rename(dst)


def run_cell(src: Path, cell: Path, sets: list[str], ref: float | None) -> dict:
    """Run (or read back) one recipe on a copy of `src`; its wall.json."""
    run = cell / "run"
    wall_file = cell / "wall.json"
    if wall_file.exists() and (run / "summary.json").exists():
        record = json.loads(wall_file.read_text())
        if record["sets"] != sets:
            raise SystemExit(f"{cell} holds the recipe {record['sets']}, not {sets}; give another --out or name")
        return record
    if not run.exists():
        copy_run(src, run)
    cmd = [sys.executable, "-m", "flows.cli", "run", str((run / "config.yaml").resolve())]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with open(cell / "run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parents[1]).returncode
    if rc:
        raise SystemExit(f"{cell.name} on {src} failed (exit {rc}); see {cell / 'run.log'}")
    record = {
        "sets": sets,
        "wall_s": round(time.perf_counter() - t0, 1),
        "reference_step_s": ref,
        "reran": reran(manifests(src), manifests(run)),
    }
    if "teacher" in record["reran"]:
        raise SystemExit(f"{cell}: the teacher trained again; the recipe {sets} changed it")
    wall_file.write_text(json.dumps(record) + "\n")
    return record


def summarize(name: str, sets: list[str], rows: list[dict]) -> dict:
    """One recipe's rows and their means (val and held-out student - control)."""
    over = [r["over_control"] for r in rows]
    held = [r["held_out"]["student"] - r["held_out"]["control"] for r in rows if "control" in r["held_out"]]
    return {
        "recipe": name,
        "sets": sets,
        "runs": rows,
        "mean_over_control": round(statistics.fmean(over), 2),
        "min_over_control": min(over),
        "held_out_over_control": round(statistics.fmean(held), 2) if held else None,
        "min_held_out_over_control": round(min(held), 2) if held else None,
        "mean_gain": round(statistics.fmean(r["gain"] for r in rows), 2),
    }


def label(run: Path) -> str:
    """`runs/bench/seed-3/run` -> `seed-3`: the run's folder in the benchmark's output."""
    return run.parent.name if run.name == "run" else run.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", required=True, help="finished demo run directories (hold config.yaml)")
    parser.add_argument(
        "--recipe", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE", help="repeatable"
    )
    parser.add_argument("--out", default="runs/student-recipes")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "summary.json").exists():
            raise SystemExit(f"--runs {run}: not a finished run (no summary.json)")
    if len({label(r) for r in runs}) != len(runs):
        raise SystemExit(f"--runs {args.runs}: two runs would share a folder in --out")
    recipes = [parse_recipe(words) for words in args.recipe]
    if len({n for n, _ in recipes}) != len(recipes):
        raise SystemExit("--recipe: two recipes share a name")
    for name, sets in recipes:
        for run in runs:
            check_teacher(run, name, sets)
    ref = None if args.no_reference else measure_reference()
    out = Path(args.out)
    results = [
        summarize(
            SOURCE,
            [],
            [
                seed_row(label(r), json.loads((r / "summary.json").read_text()), 0.0, None) | {"run": str(r)}
                for r in runs
            ],
        )
    ]
    for name, sets in recipes:
        rows = []
        for run in runs:
            cell = out / label(run) / name
            record = run_cell(run, cell, sets, ref)
            summary = json.loads((cell / "run" / "summary.json").read_text())
            row = seed_row(label(run), summary, record["wall_s"], record.get("reference_step_s"))
            rows.append(row | {"run": str(run), "reran": record["reran"]})
            print(json.dumps({"recipe": name, **rows[-1]}), file=sys.stderr, flush=True)
        results.append(summarize(name, sets, rows))
    for r in results[0]["runs"]:  # a source run's wall time is its whole demo's, not comparable
        r.pop("wall_s"), r.pop("reference_steps")
    print(
        json.dumps(
            {
                "benchmark": "student_recipes",
                "metric": json.loads((runs[0] / "summary.json").read_text())["metric"],
                "reference_step_s": ref,
                "machine": machine(),
                "recipes": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
