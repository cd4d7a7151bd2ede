"""Paths as users have them: folders with spaces and non-ASCII letters (laptops, shared drives)."""

import json

import pytest

from flows.cli import main

ODD = "my projects/ünïcode rün"


@pytest.mark.slow
def test_the_quick_demo_and_a_stage_run_under_a_folder_with_spaces(prefect_harness, tmp_path, capsys):
    out = tmp_path / ODD
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"][0]["pseudo"]["images"] > 0  # the shards under the odd folder were read, not split
    before = (run / "round-0/student/manifest.json").read_bytes()
    assert main(["stage", "student", str(run / "config.yaml")]) == 0  # up to date: skipped
    assert (run / "round-0/student/manifest.json").read_bytes() == before
    capsys.readouterr()
    assert main(["shards", "build", str(out / "world" / "JPEGImages"), str(out / "more shards")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] > 0 and ODD in report["pattern"]
    pattern = f"data.unlabeled_shards={report['pattern']}"
    assert main(["stage", "pseudo-label", str(run / "config.yaml"), "--set", pattern]) == 0
