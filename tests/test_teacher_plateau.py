"""benchmarks/teacher_plateau.py: the same teacher trained longer, on val and held out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.benchmark_module import ROOT


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo's run directory, shared: the benchmark only reads it and trains its
    points under its own --out."""
    out = tmp_path_factory.mktemp("quick-demo")
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return out / "run"


@pytest.mark.slow
def test_a_longer_teacher_is_measured_on_both_splits_and_not_retrained_on_resume(quick_run, tmp_path):
    run = quick_run
    cmd = [sys.executable, str(ROOT / "benchmarks" / "teacher_plateau.py"), "--run", str(run)]
    cmd += ["--factors", "1.25", "--no-reference", "--out", str(tmp_path / "plateau")]
    first = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    base, longer = first["points"]
    teacher = json.loads((run / "round-0" / "teacher" / "metrics.json").read_text())
    assert base["factor"] == 1.0 and base["val"] == pytest.approx(teacher["AP"], abs=0.01)
    assert longer["steps"] == round(1.25 * base["steps"]) and "held_out" in longer
    trained = json.loads(
        (
            tmp_path / "plateau" / f"steps-{longer['steps']}" / "run" / "round-0" / "teacher" / "manifest.json"
        ).read_text()
    )
    assert trained["inputs"]["train"]["steps"] == longer["steps"]
    for split in ("val", "held_out"):
        assert longer[f"{split}_gain"] == pytest.approx(longer[split] - base[split], abs=0.01)
    assert first["near_plateau"] == (longer["val_gain"] < 1.0 and longer["held_out_gain"] < 1.0)
    # a second invocation evaluates the finished point again without training it
    log = tmp_path / "plateau" / f"steps-{longer['steps']}" / "stage.log"
    stamp = log.stat().st_mtime_ns
    again = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    assert log.stat().st_mtime_ns == stamp and again["points"][1]["val"] == longer["val"]


@pytest.mark.slow
def test_set_trains_every_point_with_its_recipe_and_refuses_another_recipes_points(quick_run, tmp_path):
    run = quick_run
    out = tmp_path / "plateau"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "teacher_plateau.py"), "--run", str(run), "--no-reference"]
    cmd += ["--factors", "1.25", "--out", str(out), "--set", "teacher.steps=8", "--set", "teacher.lr=0.005"]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    assert [p["steps"] for p in result["points"]] == [8, 10]
    assert result["sets"] == ["teacher.steps=8", "teacher.lr=0.005"]
    for p in result["points"]:
        manifest = json.loads(
            (out / f"steps-{p['steps']}" / "run" / "round-0" / "teacher" / "manifest.json").read_text()
        )
        assert manifest["inputs"]["train"]["steps"] == p["steps"]
        assert manifest["inputs"]["train"]["lr"] == 0.005
    longer = result["points"][1]
    assert longer["val_gain"] == pytest.approx(longer["val"] - result["points"][0]["val"], abs=0.01)
    # the same --out with another recipe is refused, naming both
    other = [*cmd[:-1], "teacher.lr=0.004"]
    failed = subprocess.run(other, capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode != 0 and "teacher.lr=0.005" in failed.stderr and "teacher.lr=0.004" in failed.stderr


def test_curve_gives_gains_over_the_point_before_and_the_first_point_near_its_plateau(tmp_path):
    from tests.benchmark_module import load_benchmark

    plateau = load_benchmark("teacher_plateau")
    points = [
        {"steps": 1200, "val": 60.0, "held_out": 62.0},
        {"steps": 1500, "val": 62.5, "held_out": 63.9},  # +2.5: still climbing
        {"steps": 1875, "val": 63.4, "held_out": 65.1},  # val +0.9 but held-out +1.2
        {"steps": 2344, "val": 63.8, "held_out": 65.6},  # +0.4 / +0.5: 1,875 is near
        {"steps": 2930, "val": 64.0, "held_out": 65.7},
    ]
    assert plateau.curve(points) == 1875
    assert points[0].keys() == {"steps", "val", "held_out"}
    assert [p["val_over_previous"] for p in points[1:]] == [2.5, 0.9, 0.4, 0.2]
    assert [p["held_out_over_previous"] for p in points[1:]] == [1.9, 1.2, 0.5, 0.1]
    # a successor that is not 25% longer does not count, and a curve never flat gives None
    assert plateau.curve([{"steps": 1200, "val": 60.0}, {"steps": 2400, "val": 60.1}]) is None
    assert plateau.curve([{"steps": 100, "val": 1.0}, {"steps": 125, "val": 3.0}]) is None
    # a 1.25x point that dips is no plateau when a longer one climbs 1.0 past the start
    dip = [
        {"steps": 1200, "val": 83.09, "held_out": 85.24},
        {"steps": 1500, "val": 82.20, "held_out": 84.57},
        {"steps": 1875, "val": 86.56, "held_out": 87.64},
    ]
    assert plateau.curve(dip) is None and not plateau.flat_from(dip, 0)
    assert plateau.flat_from(dip[:2], 0)  # without the longer point the dip would have passed
    # the curve is drawn, with the plateau marked
    result = {"family": "detection", "metric": "AP", "sets": [], "points": points, "plateau_steps": 1875}
    png = tmp_path / "curve.png"
    plateau.plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
