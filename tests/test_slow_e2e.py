"""End-to-end runs at other settings (marked slow; `make test-slow`, run by CI)."""

import json
import math

import pytest

from flows.cli import main

pytestmark = pytest.mark.slow


def run_quick(out, *overrides):
    args = ["demo", "--quick", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return json.loads((out / "run" / "summary.json").read_text())


def assert_finite(summary):
    r0 = summary["rounds"][0]
    for key in ("teacher_metrics", "student_metrics"):
        assert all(math.isfinite(v) for v in r0[key].values())


@pytest.mark.parametrize("level", ["S2", "S3", "S4"])
def test_demo_runs_at_every_augment_level(prefect_harness, tmp_path, level):
    summary = run_quick(tmp_path, f"teacher.augment_level={level}", f"student.train.augment_level={level}")
    assert_finite(summary)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"augment_level: {level}" in config


def test_demo_with_nasfpn_neck_and_two_rounds(prefect_harness, tmp_path):
    summary = run_quick(tmp_path, "model.neck=nasfpn", "model.nasfpn_repeats=2", "rounds=2")
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    # round 1's teacher is round 0's student
    assert summary["rounds"][1]["teacher_metrics"] == summary["rounds"][0]["student_metrics"]
    assert (tmp_path / "run" / "round-1" / "student" / "model.pt").exists()
    assert_finite(summary)


def test_student_from_teacher_with_process_pool_labeling(prefect_harness, tmp_path):
    summary = run_quick(tmp_path, "student.init=teacher", "pseudo.runner=process", "student.normalize_loss=false")
    assert_finite(summary)
    assert summary["rounds"][0]["pseudo"]["images"] == 48
