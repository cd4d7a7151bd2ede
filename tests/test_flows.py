"""The quick demo end to end, as Prefect flows, and reruns checked through manifests."""

import json
import math
from pathlib import Path

import pytest

from flows.cli import main

STAGES = ["round-0/teacher", "round-0/audit", "round-0/pseudo", "round-0/student", "round-0/control"]


def manifest_stamps(run: Path) -> dict[str, int]:
    return {s: (run / s / "manifest.json").stat().st_mtime_ns for s in STAGES}


def artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}


@pytest.fixture(scope="module")
def quick_run(prefect_harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_every_stage_produced_its_outputs(quick_run):
    run = quick_run / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["family"] == "detection" and summary["metric"] == "AP"
    (r0,) = summary["rounds"]
    for key in ("teacher_metrics", "student_metrics", "control_metrics"):
        assert set(r0[key]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in r0[key].values())
    assert r0["pseudo"]["images"] == 48 and 0 <= r0["pseudo"]["kept"] <= 48
    assert 0 < summary["elapsed_s"] < 600  # the quick demo stays quick (about a minute when the machine is idle)
    for stage in ("round-0/teacher", "round-0/student", "round-0/control"):
        for f in ("model.pt", "metrics.json", "train.log", "manifest.json", "predictions/detections.json"):
            assert (run / stage / f).stat().st_size > 0, f"{stage}/{f}"
        # the val predictions in COCO's results format, covered by the stage's file digests
        assert "predictions/detections.json" in json.loads((run / stage / "manifest.json").read_text())["file_digests"]
    pseudo = run / "round-0/pseudo"
    assert sorted(p.name for p in pseudo.glob("labels-*.tar")) == [f"labels-{i:06d}.tar" for i in range(3)]
    manifest = json.loads((pseudo / "manifest.json").read_text())
    per_shard = [json.loads(p.read_text()) for p in sorted(pseudo.glob("labels-*.json"))]
    assert manifest["outputs"]["stats"]["kept"] == sum(s["kept"] for s in per_shard)
    assert (run / "config.yaml").exists() and (run / "report.md").read_text().startswith("# Noisy Student")
    assert {"metrics-table", "pseudo-stats-round-0", "labeling-progress-round-0", "pseudo-audit-round-0"} <= (
        artifact_keys()
    )
    # the audit: 8 held-out images of the quick world, its recommendations in the summary
    report = json.loads((run / "round-0/audit/audit.json").read_text())
    assert report["images"] == 8 and report["split"] == "holdout" and report["drawn_threshold"] == 0.05
    assert r0["audit"]["f1_threshold"] == report["f1_threshold"] and r0["pseudo"]["threshold"] == 0.05
    assert (run / "round-0/audit/pr.png").stat().st_size > 0 and (run / "round-0/audit/grid.jpg").stat().st_size > 0


def test_rerun_recomputes_nothing(quick_run):
    run = quick_run / "run"
    before = manifest_stamps(run)
    model_before = (run / "round-0/student/model.pt").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(quick_run)]) == 0
    assert manifest_stamps(run) == before
    assert (run / "round-0/student/model.pt").stat().st_mtime_ns == model_before


def test_changed_stage_invalidates_only_the_stages_after_it(quick_run):
    run = quick_run / "run"
    before = manifest_stamps(run)
    assert main(["demo", "--quick", "--out", str(quick_run), "--set", "pseudo.score_threshold=0.02"]) == 0
    after = manifest_stamps(run)
    assert after["round-0/teacher"] == before["round-0/teacher"]
    assert after["round-0/pseudo"] != before["round-0/pseudo"]
    assert after["round-0/student"] != before["round-0/student"]
    assert after["round-0/control"] == before["round-0/control"]  # it reads no pseudo-label
    manifest = json.loads((run / "round-0/pseudo/manifest.json").read_text())
    assert manifest["inputs"]["rule"]["score_threshold"] == 0.02


def test_student_recipe_change_reruns_the_control_and_the_student_only(quick_run):
    run = quick_run / "run"
    overrides = ["--set", "pseudo.score_threshold=0.02", "--set", "student.train.lr=0.002"]
    before = manifest_stamps(run)
    assert main(["demo", "--quick", "--out", str(quick_run), *overrides]) == 0
    after = manifest_stamps(run)
    assert {s for s in STAGES if after[s] != before[s]} == {"round-0/student", "round-0/control"}
    control = json.loads((run / "round-0/control/manifest.json").read_text())
    assert control["inputs"]["student"]["train"]["lr"] == 0.002
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"][0]["control_metrics"] == json.loads((run / "round-0/control/metrics.json").read_text())
    # a crash that lost the control's manifest retrains the control alone
    (run / "round-0/control/manifest.json").unlink()
    assert main(["demo", "--quick", "--out", str(quick_run), *overrides]) == 0
    again = manifest_stamps(run)
    assert {s for s in STAGES if again[s] != after[s]} == {"round-0/control"}


def test_crash_redoes_only_what_is_missing(quick_run):
    run = quick_run / "run"
    overrides = ["--set", "pseudo.score_threshold=0.02"]
    before = manifest_stamps(run)
    # a crash before the student finished leaves no student manifest
    (run / "round-0/student/manifest.json").unlink()
    assert main(["demo", "--quick", "--out", str(quick_run), *overrides]) == 0
    after = manifest_stamps(run)
    assert after["round-0/teacher"] == before["round-0/teacher"]
    assert after["round-0/pseudo"] == before["round-0/pseudo"]
    assert (run / "round-0/student/manifest.json").exists()


def test_stage_command_reruns_one_stage(quick_run, capsys):
    run = quick_run / "run"
    cfg = run / "config.yaml"  # the run's own config, written by the parent flow
    before = manifest_stamps(run)
    assert main(["stage", "teacher", str(cfg)]) == 0
    assert manifest_stamps(run) == before  # up to date: skipped
    capsys.readouterr()
    assert main(["stage", "evaluate", str(cfg)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{") :])
    student = json.loads((run / "round-0/student/metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(student["AP"])


def test_auto_threshold_labels_at_the_audits_f1_threshold(quick_run):
    run = quick_run / "run"
    before = manifest_stamps(run)
    assert main(["demo", "--quick", "--out", str(quick_run), "--set", "pseudo.score_threshold=auto"]) == 0
    after = manifest_stamps(run)
    audit = json.loads((run / "round-0/audit/manifest.json").read_text())
    pseudo = json.loads((run / "round-0/pseudo/manifest.json").read_text())
    assert pseudo["inputs"]["rule"]["score_threshold"] == audit["outputs"]["f1_threshold"]
    assert pseudo["outputs"]["threshold"] == audit["outputs"]["f1_threshold"]
    assert after["round-0/teacher"] == before["round-0/teacher"]
    # the audit drew its grid at 0.05 before; under auto it draws the F1 threshold, so it reran
    assert after["round-0/audit"] != before["round-0/audit"]
    assert audit["inputs"]["drawn_threshold"] == "auto"


def test_soup_of_the_student_and_a_second_ingredient(quick_run):
    from engine.training import evaluate_checkpoint

    run = quick_run / "run"
    ingredient = "soup.ingredients=[[student.alpha=0.5]]"
    assert main(["demo", "--quick", "--out", str(quick_run), "--set", ingredient]) == 0
    report = json.loads((run / "round-0/soup/soup.json").read_text())
    names = [r["name"] for r in report["ingredients"]]
    assert names == ["student", "student-1"] and report["split"] == "holdout"
    assert (run / "round-0/student-1/model.pt").exists()
    best = max(report["ingredients"], key=lambda r: r["held_out"])["name"]
    assert report["soups"]["greedy"]["ingredients"][0] == best
    assert report["soups"]["uniform"]["ingredients"] == names
    assert report["soups"]["greedy"]["held_out"] >= max(r["held_out"] for r in report["ingredients"])
    # the reported val metric is the saved soup's
    cfg = __import__("configs").load_config(run / "config.yaml")
    again = evaluate_checkpoint(cfg, run / "round-0/soup/uniform/model.pt")
    assert again["AP"] == pytest.approx(report["soups"]["uniform"]["val"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"][0]["soup"]["soups"]["greedy"]["val"] == report["soups"]["greedy"]["val"]
    assert "soup-round-0" in artifact_keys()


def test_a_model_cut_in_half_is_found_before_it_is_used(quick_run, capsys):
    """The manifest records each output file's sha256: a stage that would read a cut-off
    upstream file stops with one line naming it, and the cut stage itself recomputes."""
    run = quick_run / "run"
    cfg = run / "config.yaml"
    model = run / "round-0/teacher/model.pt"
    whole = model.read_bytes()
    model.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    # another threshold: the pseudo-label stage would load the teacher
    assert main(["stage", "pseudo-label", str(cfg), "--set", "pseudo.score_threshold=0.03"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("noisy-student: the teacher of round 0: ") and str(model) in last, err
    assert "cut off or changed" in last and "Traceback" not in err, err
    teacher_before = (run / "round-0/teacher/manifest.json").read_bytes()
    assert main(["stage", "teacher", str(cfg)]) == 0  # recomputed, not skipped
    assert (run / "round-0/teacher/manifest.json").read_bytes() != teacher_before
    assert torch_loads(model)
    manifest = json.loads((run / "round-0/teacher/manifest.json").read_text())
    assert set(manifest["file_digests"]) == {"model.pt", "metrics.json", "predictions/detections.json"}


def torch_loads(path: Path) -> bool:
    import torch

    return isinstance(torch.load(path, map_location="cpu", weights_only=False), dict)


def test_a_copied_run_directory_works_from_another_folder(quick_run, tmp_path, monkeypatch, capsys):
    """Paths inside a run directory are relative to it: a copy, used from another working
    directory, finds its stages up to date and evaluates its own student."""
    import shutil

    run = quick_run / "run"
    assert main(["demo", "--quick", "--out", str(quick_run)]) == 0  # whole again after the tests above
    copy = tmp_path / "moved" / "run"
    shutil.copytree(run, copy)
    for path in [copy / "config.yaml", *copy.rglob("*.json")]:
        assert str(run) not in path.read_text(), f"{path} names the original run directory"
    monkeypatch.chdir(tmp_path / "moved")
    before = manifest_stamps(copy)
    assert main(["stage", "student", "run/config.yaml"]) == 0
    assert main(["stage", "control", "run/config.yaml"]) == 0
    assert manifest_stamps(copy) == before  # up to date where it now is
    (run / "round-0/student/model.pt").unlink()  # the original's model is not what the copy reads
    capsys.readouterr()
    assert main(["stage", "evaluate", "run/config.yaml"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{") :])
    assert metrics["AP"] == pytest.approx(json.loads((copy / "round-0/student/metrics.json").read_text())["AP"])
