"""benchmarks/student_recipes.py: students of other recipes on the same teacher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from configs import dump_config, load_config
from engine.rundir import write_manifest
from flows.stages import teacher_inputs
from tests.benchmark_module import ROOT, load_benchmark


def test_a_recipe_is_a_name_and_key_value_settings():
    recipes = load_benchmark("student_recipes")
    assert recipes.parse_recipe(["alpha-2", "student.alpha=2"]) == ("alpha-2", ["student.alpha=2"])
    for words, says in (
        (["student.alpha=2"], "names the recipe"),
        (["source", "student.alpha=2"], "names the recipe"),
        (["alpha-2"], "at least one"),
        (["alpha-2", "student.alpha"], "KEY=VALUE"),
    ):
        with pytest.raises(SystemExit, match=says):
            recipes.parse_recipe(words)


def finished_teacher(run, cfg) -> None:
    """A run directory whose round-0 teacher finished with `cfg`'s inputs (no model file:
    the check reads the manifest only)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    write_manifest(run / "round-0" / "teacher", teacher_inputs(cfg), {"files": [], "digest": "t"})


def test_a_recipe_that_would_retrain_the_teacher_is_refused_before_anything_runs(tmp_path):
    recipes = load_benchmark("student_recipes")
    run = tmp_path / "seed-0" / "run"
    finished_teacher(run, load_config("demo-segmentation-quick"))
    # student-side settings and how a stage runs (workers, logging) leave the teacher alone
    for sets in (["student.alpha=2", "pseudo.score_threshold=0.7"], ["data.num_workers=0", "teacher.log_every=7"]):
        recipes.check_teacher(run, "ok", sets)
    for sets, says in (
        (["teacher.steps=9"], r"its teacher\.steps\)"),
        (["data.labeled_limit=50"], r"its data\.labeled_limit\)"),
        (["model.neck_channels=8", "student.alpha=2"], r"its model\.neck_channels\)"),
        (["student.alpa=2"], "alpa"),
    ):
        with pytest.raises(SystemExit, match=says):
            recipes.check_teacher(run, "bad", sets)
    with pytest.raises(SystemExit, match="teacher has not finished"):
        recipes.check_teacher(tmp_path / "empty", "ok", ["student.alpha=2"])


def test_the_stages_that_ran_again_are_those_whose_manifest_changed_and_means_are_per_split():
    recipes = load_benchmark("student_recipes")
    source = {"teacher": "t", "audit": "a", "pseudo": "p", "student": "s", "control": "c"}
    assert recipes.reran(source, {**source, "student": "s2"}) == ["student"]
    assert recipes.reran(source, {**source, "pseudo": "p2", "student": "s2", "audit": "a2"}) == [
        "audit",
        "pseudo",
        "student",
    ]
    rows = [
        {"over_control": 1.0, "gain": 0.5, "held_out": {"teacher": 80.0, "control": 79.0, "student": 81.0}},
        {"over_control": 3.0, "gain": -0.5, "held_out": {"teacher": 70.0, "control": 70.0, "student": 70.5}},
    ]
    row = recipes.summarize("r", ["student.alpha=2"], rows)
    assert row["mean_over_control"] == 2.0 and row["min_over_control"] == 1.0
    assert row["held_out_over_control"] == 1.25 and row["min_held_out_over_control"] == 0.5
    assert row["mean_gain"] == 0.0


@pytest.mark.slow
def test_a_pseudo_only_recipe_trains_the_student_again_keeps_the_control_and_the_source(tmp_path):
    demo = tmp_path / "demo"
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--quick", "--family", "segmentation", "--out", str(demo)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    source = demo / "run"
    before = {p: p.read_bytes() for p in (source / "round-0").rglob("*") if p.is_file()}
    out = tmp_path / "recipes"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "student_recipes.py"), "--runs", str(source)]
    cmd += ["--recipe", "alpha-3", "student.alpha=3", "--out", str(out), "--no-reference"]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    own, alpha = result["recipes"]
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1  # what the figures ran on
    assert own["recipe"] == "source" and alpha["recipe"] == "alpha-3"
    row = alpha["runs"][0]
    assert row["reran"] == ["student"]  # the control has no pseudo part: alpha leaves it valid
    cell = out / "demo" / "alpha-3" / "run" / "round-0"
    assert json.loads((cell / "student" / "manifest.json").read_text())["inputs"]["student"]["alpha"] == 3
    assert row["control_mIoU"] == own["runs"][0]["control_mIoU"]
    assert row["teacher_mIoU"] == own["runs"][0]["teacher_mIoU"]
    assert row["over_control"] == pytest.approx(row["student_mIoU"] - row["control_mIoU"], abs=0.02)
    assert {p: p.read_bytes() for p in (source / "round-0").rglob("*") if p.is_file()} == before
    # read back on a second invocation; the same name with other settings is refused
    log = out / "demo" / "alpha-3" / "run.log"
    stamp = log.stat().st_mtime_ns
    again = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    assert log.stat().st_mtime_ns == stamp and again["recipes"][1]["runs"][0] == row
    other = [*cmd[:-6], "--recipe", "alpha-3", "student.alpha=4", "--out", str(out), "--no-reference"]
    failed = subprocess.run(other, capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode != 0 and "student.alpha=3" in failed.stderr and "student.alpha=4" in failed.stderr
