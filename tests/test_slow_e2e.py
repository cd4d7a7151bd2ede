"""End-to-end runs at other settings (marked slow; `make test-slow`, run by CI)."""

import json
import math

import pytest
import yaml

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


def test_segmentation_demo_end_to_end(prefect_harness, tmp_path, capsys):
    """Teacher -> pixel pseudo-labels (two-scale teacher) -> noised student, reported in mIoU."""
    from data.shards import iter_shard
    from segmentation.pseudo import decode

    args = [
        "demo",
        "--family",
        "segmentation",
        "--quick",
        "--out",
        str(tmp_path),
        "--set",
        "pseudo.scales=[0.5,1.0]",
        "--set",
        "student.train.augment_level=S3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teacher   control   student" in out and "(mIoU; control: the student's recipe on human labels only)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["family"] == "segmentation" and summary["metric"] == "mIoU"
    r0 = summary["rounds"][0]
    assert_finite(summary)
    assert {"mIoU", "pixel_accuracy"} <= set(r0["teacher_metrics"])
    pseudo = r0["pseudo"]
    assert pseudo["images"] == 48 and 0 < pseudo["kept"] <= 48
    sidecars = sorted((tmp_path / "run" / "round-0" / "pseudo").glob("labels-*.tar"))
    assert len(sidecars) == 3
    kept_pixels = 0
    for tar in sidecars:
        for _, record in iter_shard(str(tar)):
            mask = decode(record["png"])["mask"]
            assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
            kept_pixels += int((mask != 255).sum())
    assert kept_pixels == pseudo["labels"]
    shard_stats = [json.loads(t.with_suffix(".json").read_text()) for t in sidecars]
    assert sum(sum(s["class_counts"]) for s in shard_stats) == kept_pixels
    assert sum(s["pixels"] for s in shard_stats) >= kept_pixels
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["pseudo"]["scales"] == [0.5, 1.0]


def test_rounds_auto_stops_at_min_gain_or_max_rounds(prefect_harness, tmp_path):
    """rounds: auto runs until a round gains less than min_gain (at most max_rounds), plots the
    metric per round into rounds.png and shows it in the UI's `rounds` artifact."""
    from prefect.client.orchestration import get_client

    summary = run_quick(tmp_path, "rounds=auto", "min_gain=-1000", "max_rounds=2")
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["stopped"] == "max_rounds=2 reached"
    png = (tmp_path / "run" / "rounds.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    with get_client(sync_client=True) as client:
        (latest,) = [a for a in client.read_latest_artifacts() if a.key == "rounds"]
    assert latest.type == "markdown" and "](data:image/png;base64," in latest.data
    # The same run directory: round 0 is kept, and a gain below min_gain stops after it.
    summary = run_quick(tmp_path, "rounds=auto", "min_gain=1000", "max_rounds=3")
    assert [r["round"] for r in summary["rounds"]] == [0]
    assert summary["stopped"].startswith("round 0 gained ") and "less than min_gain=1000" in summary["stopped"]
    assert "Rounds stopped: round 0 gained" in (tmp_path / "run" / "report.md").read_text()
