"""benchmarks/backbones.py: its cells, its findings, the cells' kept wall times; a tiny run."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_module import load_benchmark

bb = load_benchmark("backbones")


def _row(teacher: float, control: float, student: float) -> dict:
    def ms(v: float) -> dict:
        return {"mean": v, "std": 0.0, "n": 1, "values": [v]}

    return {
        "teacher": ms(teacher),
        "control": ms(control),
        "student": ms(student),
        "over_control": ms(student - control),
        "gain": ms(student - teacher),
    }


def test_pretrain_cells_load_the_weights_only_in_the_imagenet_cells():
    cells = {c.name: c.overrides for c in bb.pretrain_cells("/w/lite0.pth")}
    assert set(cells) == {"random-S1", "random-S4", "imagenet-S1", "imagenet-S4"}
    for name, overrides in cells.items():
        level = name.split("-")[1]
        assert f"teacher.augment_level={level}" in overrides and f"student.train.augment_level={level}" in overrides
        assert ("model.backbone_checkpoint=/w/lite0.pth" in overrides) == name.startswith("imagenet")
        assert "model.backbone=efficientnet_lite0" in overrides


def test_the_larger_student_learns_from_the_base_teacher_for_as_long_as_it():
    cells = {c.name: c for c in bb.backbone_cells(300, 0.003, 50)}
    assert list(cells) == ["base", "bit", "vit", "larger-student"]
    larger = cells["larger-student"]
    assert larger.shares == ("round-0/teacher", "round-0/pseudo") and larger.share_from == "base"
    assert {"student.init=scratch", "student.model.backbone=tf_efficientnet_b1", "student.train.steps=300"} <= set(
        larger.overrides
    )
    assert "model.neck=simple" in cells["vit"].overrides
    assert cells["bit"].overrides == ("model.backbone=resnetv2_50x1_bit",)


def test_findings_read_the_pretrain_pattern_from_the_means():
    rows = {
        "random-S1": _row(20.0, 22.0, 24.0),
        "random-S4": _row(15.0, 16.0, 15.5),
        "imagenet-S1": _row(30.0, 31.0, 32.0),
        "imagenet-S4": _row(28.0, 29.0, 30.0),
    }
    lines = bb.findings("pretrain", rows)
    assert "+10.00 at S1, +13.00 at S4: it does not shrink" in lines[0]
    assert "from random init: +2.00 at S1, -0.50 at S4: it does not add at every level" in lines[1]
    assert "from imagenet init: +1.00 at S1, +1.00 at S4: it adds at both levels" in lines[2]
    rows["imagenet-S4"] = _row(16.0, 17.0, 18.0)
    assert "it shrinks with stronger augmentation" in bb.findings("pretrain", rows)[0]


def test_a_finished_cell_keeps_its_first_time(tmp_path, monkeypatch):
    calls = []

    def fake_run_cell(root, seed, cell, scale, family, base_level):
        calls.append(cell.name)
        if len(calls) == 1:
            raise KeyboardInterrupt  # a sitting stopped inside the cell: its seconds still count
        return {"metric": "AP", "rounds": [], "seconds": 0.0}

    monkeypatch.setattr(bb, "run_cell", fake_run_cell)
    cell = bb.Cell("base")
    with pytest.raises(KeyboardInterrupt):
        bb.timed_cell(tmp_path, 0, cell, {}, "detection", "S2")
    wall = tmp_path / "seed-0" / "base" / "wall.json"
    assert json.loads(wall.read_text())["finished"] is False
    first = bb.timed_cell(tmp_path, 0, cell, {}, "detection", "S2")
    record = json.loads(wall.read_text())
    assert record["finished"] is True and first["seconds"] == record["seconds"]
    wall.write_text(json.dumps({"seconds": 123.4, "finished": True}))
    assert bb.timed_cell(tmp_path, 0, cell, {}, "detection", "S2")["seconds"] == 123.4  # a skip adds nothing
    assert calls == ["base"] * 3


def test_the_same_images_control_replaces_only_the_control():
    res = {"metric": "AP", "rounds": [{"teacher": 30.0, "control": 10.0, "student": 28.0, "over_control": 18.0}]}
    out = bb.with_control(res, {"control": 25.0, "seconds": 12.5, "batch_size": 16})
    assert out["rounds"][0] == {"teacher": 30.0, "control": 25.0, "student": 28.0, "over_control": 3.0}
    assert out["seconds"] == 12.5 and res["rounds"][0]["control"] == 10.0  # the cell's own result is untouched


@pytest.mark.slow
def test_tiny_backbones_table_runs_through_the_flow(tmp_path):
    out = tmp_path / "bb"
    assert bb.main(["--table", "backbones", "--tiny", "--seeds", "0", "--out", str(out), "--no-reference"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert list(result["rows"]) == ["base", "bit", "vit", "larger-student", "larger-student-same-images"]
    assert all(r["student"]["n"] == 1 for r in result["rows"].values())
    # the larger student against a control of as many images per step as it processes
    rows = result["rows"]
    assert rows["larger-student-same-images"]["student"] == rows["larger-student"]["student"]
    assert rows["larger-student-same-images"]["control"] != rows["larger-student"]["control"]
    manifests = {
        name: json.loads((out / "seed-0" / name / "run/round-0/control/manifest.json").read_text())
        for name in ("larger-student", "larger-student-same-images")
    }
    batch = {k: m["inputs"]["student"]["train"]["batch_size"] for k, m in manifests.items()}
    assert batch["larger-student-same-images"] == 2 * batch["larger-student"]  # human + pseudo (pseudo_ratio 1)
    same = result["same_images_controls"]["larger-student-same-images"]
    assert same == {"of": "larger-student", "batch_size": [batch["larger-student-same-images"]]}
    seed = out / "seed-0"
    teacher = "run/round-0/teacher/model.pt"
    assert (seed / "larger-student" / teacher).samefile(seed / "base" / teacher)
    # the B0 teacher's student is a wider net trained from scratch, and its control too
    assert result["rows"]["larger-student"]["control"]["mean"] != result["rows"]["base"]["control"]["mean"]
    assert result["step_ratios"]["bit"]["backbone"] == "test_resnetv2_bit"
    # each row says what its teacher labels on the held-out split (the same teacher's for the B1 rows)
    labels = {name: r["teacher_labels"] for name, r in rows.items()}
    assert set(labels["base"]) == {"threshold", "circle", "square", "triangle"}
    assert labels["larger-student-same-images"] == labels["larger-student"] == labels["base"]
    report = (out / "report.md").read_text()
    assert "| larger-student |" in report and (out / "table.png").stat().st_size > 1000


def _audit(cell_dir, classes: dict[str, tuple[list, list]], drawn: float) -> None:
    """An audit report in engine/audit.py's layout: per class precision and recall over
    the thresholds 0.3, 0.5, 0.7."""
    stage = cell_dir / "run" / "round-0" / "audit"
    stage.mkdir(parents=True)
    report = {
        "thresholds": [0.3, 0.5, 0.7],
        "classes": {c: {"precision": p, "recall": r, "f1": [0.0] * 3, "labels": 10} for c, (p, r) in classes.items()},
        "all": {"precision": [0.5] * 3, "recall": [0.5] * 3, "f1": [0.5] * 3},
        "drawn_threshold": drawn,
    }
    (stage / "audit.json").write_text(json.dumps(report))


def test_teacher_labels_read_each_class_at_the_pseudo_threshold(tmp_path):
    classes = {
        "background": ([0.9, 0.93, 0.95], [0.98, 0.96, 0.9]),
        "circle": ([0.35, None, None], [0.18, 0.0, 0.0]),
        "square": ([0.52, 0.55, 0.58], [0.61, 0.37, 0.12]),
    }
    _audit(tmp_path / "seg", classes, 0.5)
    seg = bb.teacher_labels(tmp_path / "seg", "segmentation")
    assert seg == {
        "threshold": 0.5,
        "circle": {"precision": None, "recall": 0.0},
        "square": {"precision": 0.55, "recall": 0.37},
    }
    _audit(tmp_path / "det", classes, 0.7)
    det = bb.teacher_labels(tmp_path / "det", "detection")
    assert list(det) == ["threshold", "background", "circle", "square"] and det["square"]["recall"] == 0.12
    assert bb.teacher_labels(tmp_path / "none", "detection") is None
    other = {**seg, "circle": {"precision": 0.6, "recall": 0.2}}
    mean = bb.labels_row([seg, other])
    # Precision is a mean over the seeds that kept a label of the class, not a 0 for the others.
    assert mean["circle"] == pytest.approx({"precision": 0.6, "precision_seeds": 1, "recall": 0.1})
    assert mean["square"] == pytest.approx({"precision": 0.55, "precision_seeds": 2, "recall": 0.37})
    assert bb.labels_row([seg, seg])["circle"] == {"precision": None, "precision_seeds": 0, "recall": 0.0}
    assert bb.labels_cell(mean) == "circle 0.10, square 0.37 at 0.5"
