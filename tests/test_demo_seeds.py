"""benchmarks/demo_seeds.py: stopping leaves no demo running; seed rows; finished seeds read back."""

import json
import subprocess
import sys
import time

import pytest

from tests.benchmark_module import load_benchmark

ds = load_benchmark("demo_seeds")

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
)


def test_stop_demos_ends_running_children_and_kills_those_that_ignore_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert stubborn.stdout.readline().strip() == "up"  # its handler is in place
    t0 = time.monotonic()
    ds.stop_demos([polite, stubborn, finished], grace_s=2.0)
    assert polite.returncode == -15  # SIGTERM
    assert stubborn.returncode == -9  # SIGKILL after the grace
    assert finished.returncode == 0
    assert time.monotonic() - t0 < 10


def test_a_seed_row_sets_the_student_beside_its_control():
    r = {
        "teacher_metrics": {"AP": 40.0},
        "control_metrics": {"AP": 50.5},
        "student_metrics": {"AP": 48.25},
        "pseudo": {"kept": 1880, "labels": 3360},
        "held_out": {"split": "holdout", "teacher": 41.0, "control": 49.0, "student": 50.0},
    }
    row = ds.seed_row(3, {"metric": "AP", "rounds": [r]}, 900.0, 0.45)
    assert row["over_control"] == -2.25 and row["gain"] == 8.25
    assert row["control_AP"] == 50.5 and row["held_out"] == {"teacher": 41.0, "control": 49.0, "student": 50.0}
    assert row["reference_steps"] == 2000
    del r["control_metrics"]
    with pytest.raises(ValueError, match="seed 3: the run trained no control"):
        ds.seed_row(3, {"metric": "AP", "rounds": [r]}, 900.0, 0.45)


def test_a_seed_finished_earlier_is_read_back_with_the_reference_steps_around_its_run(tmp_path, monkeypatch, capsys):
    r = {
        "teacher_metrics": {"AP": 60.0},
        "control_metrics": {"AP": 58.0},
        "student_metrics": {"AP": 61.0},
        "pseudo": {"kept": 1990, "labels": 4000},
    }
    seed = tmp_path / "seed-0"
    (seed / "run").mkdir(parents=True)
    (seed / "run" / "summary.json").write_text(json.dumps({"metric": "AP", "rounds": [r]}))
    (seed / "wall.json").write_text(
        json.dumps({"wall_s": 1400.0, "reference_step_s": 0.6, "reference_step_after_s": 0.8})
    )
    monkeypatch.setattr(sys, "argv", ["demo_seeds", "--seeds", "0", "--out", str(tmp_path), "--no-reference"])
    assert ds.main() == 0
    out = json.loads(capsys.readouterr().out)
    row = out["runs"][0]
    assert row["over_control"] == 3.0 and row["reference_steps"] == 2000  # 1,400 s / 0.7 s, the mean of both
    assert row["reference_step_s"] == [0.6, 0.8]  # the row says which measurements converted it
    assert out["mean_reference_steps"] == 2000


def test_reading_back_leaves_the_reference_steps_of_seeds_it_did_not_run(tmp_path, monkeypatch, capsys):
    r = {"teacher_metrics": {"AP": 60.0}, "control_metrics": {"AP": 58.0}, "student_metrics": {"AP": 61.0}}
    seed = tmp_path / "seed-1"
    (seed / "run").mkdir(parents=True)
    (seed / "run" / "summary.json").write_text(
        json.dumps({"metric": "AP", "rounds": [r | {"pseudo": {"kept": 1, "labels": 2}}]})
    )
    wall = seed / "wall.json"
    wall.write_text(json.dumps({"wall_s": 900.0, "reference_step_s": None}))
    before = wall.read_text()
    monkeypatch.setattr(ds, "measure_reference", lambda: 0.5)  # the reference measured around this invocation
    monkeypatch.setattr(sys, "argv", ["demo_seeds", "--seeds", "1", "--out", str(tmp_path)])
    assert ds.main() == 0
    out = json.loads(capsys.readouterr().out)
    assert wall.read_text() == before  # a seed run by no measured invocation gets no measurement of this one
    assert out["reference_step_s"] == [0.5, 0.5] and out["runs"][0]["reference_steps"] == 1800
    assert out["runs"][0]["reference_step_s"] == [0.5, 0.5]
