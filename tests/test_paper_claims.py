"""benchmarks/paper_claims.py: cells, aggregation over seeds, verdicts, the report; a tiny run."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmark_module import load_benchmark

pc = load_benchmark("paper_claims")


def _res(teacher, student, kept=10, curve=None, control=None):
    """A cell's result; its control is the teacher plus 0.25 unless given."""
    control = teacher + 0.25 if control is None else control
    figures = {"teacher": teacher, "control": control, "student": student}
    figures.update(gain=student - teacher, over_control=student - control, kept=kept, labels=kept)
    return {
        "metric": "AP",
        "rounds": [figures],
        "loss_curve": curve or {"step": [], "loss_h": [], "loss_p": []},
        "seconds": 1.0,
    }


def test_mean_std_over_seeds():
    m = pc.mean_std([1.0, 2.0, 4.0])
    assert m["mean"] == pytest.approx(2.33, abs=0.01)
    assert m["std"] == pytest.approx(1.53, abs=0.01)  # sample std (n - 1)
    assert m["n"] == 3
    assert pc.mean_std([5.0])["std"] == 0.0


def test_cells_share_the_base_stages():
    cells = {c.name: c for c in pc.cells_for(list("abcde"), "S2")}
    assert list(cells)[0] == "base"
    assert "level-S2" not in cells and {"level-S1", "level-S3", "level-S4"} <= set(cells)
    assert cells["level-S3"].shares == ("round-0/teacher", "round-0/pseudo")
    assert cells["labels-50"].shares == () and "data.labeled_limit=50" in cells["labels-50"].overrides
    assert cells["round-2"].rounds == 2 and "round-0/student" in cells["round-2"].shares
    assert cells["threshold-0.3"].shares == ("round-0/teacher",) and cells["threshold-0.3"].control_of == "base"
    assert cells["norm-off-S3"].control_of == "level-S3" and cells["level-S3"].control_of is None
    # b alone still needs its S3 cell
    assert {c.name for c in pc.cells_for(["b"], "S1")} == {"base", "level-S3", "norm-off-S3"}


def test_aggregate_rows_and_verdicts():
    seeds = (0, 1)
    gains = {
        "base": 2.0,
        "level-S1": 1.0,
        "level-S3": 3.0,
        "level-S4": 4.0,
        "norm-off-S3": -1.0,
        "labels-50": 0.5,
        "labels-100": 1.5,
        "threshold-0.3": 1.0,
        "threshold-0.7": -0.5,
    }
    results = {name: {s: _res(20.0 + s, 20.0 + s + g + s) for s in seeds} for name, g in gains.items()}
    results["round-2"] = {
        s: {**_res(20.0, 22.0), "rounds": [_res(20.0, 22.0)["rounds"][0], _res(22.0, 21.0)["rounds"][0]]} for s in seeds
    }
    out = pc.aggregate(results, list("abcde"), "S2")
    a = {r["value"]: r for r in out["a"]["rows"]}
    # gain per seed: g + s, so mean g + 0.5 and std of (g, g + 1) = 0.71
    assert a["S2"]["gain"]["mean"] == pytest.approx(2.5)
    assert a["S4"]["gain"]["std"] == pytest.approx(0.71, abs=0.01)
    assert out["a"]["holds"] is True
    assert out["b"]["holds"] is True and out["b"]["rows"][1]["gain"]["mean"] == pytest.approx(-0.5)
    assert out["c"]["holds"] is True and [r["value"] for r in out["c"]["rows"]] == ["50", "100", "200"]
    assert out["d"]["holds"] is False  # round 2's student (21) is below round 1's (22)
    assert out["e"]["best"] == "0.5" and out["e"]["holds"] is False  # 0.7 loses
    # the verdicts read student - control: gains over the teacher of +2 are no gain over a control at +3
    behind = {name: {s: _res(20.0, 22.0, control=23.0) for s in seeds} for name in results}
    out = pc.aggregate(behind, list("ace"), "S2")
    assert all(r["gain"]["mean"] == 2.0 and r["over_control"]["mean"] == -1.0 for r in out["a"]["rows"])
    assert out["a"]["holds"] is False and out["c"]["holds"] is False and out["e"]["holds"] is False


def test_every_sitting_adds_its_time(tmp_path):
    assert pc.add_sitting(tmp_path, 4860.0, 0.6712) == {"elapsed_s": 4860.0, "sittings": 1, "reference_step_s": [0.671]}
    assert pc.add_sitting(tmp_path, 79.7, 0.9) == {"elapsed_s": 4939.7, "sittings": 2, "reference_step_s": [0.671, 0.9]}


def test_loss_curve_reads_the_last_log_of_each_step(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "student: 16 human + 16 pseudo\n"
        "step 5/10 lr=0.001 loss=1.5 loss_h=1 loss_p=2 grad_norm=3 (10.0 img/s)\n"
        "resuming from checkpoint.pt at step 5/10\n"
        "step 5/10 lr=0.001 loss=1.25 loss_h=0.5 loss_p=2 grad_norm=3 (10.0 img/s)\n"
        "step 10/10 lr=0 loss=1 loss_h=0.75 loss_p=1.25 grad_norm=3 (10.0 img/s)\n"
    )
    curve = pc.loss_curve(log)
    assert curve["step"] == [5, 10]
    assert curve["loss_h"] == [0.5, 0.75] and curve["loss_p"] == [2.0, 1.25]
    assert math.isnan(pc.jitter({"loss_p": [1.0]}, "loss_p"))
    assert pc.jitter({"loss_p": [4.0, 1.0, 2.0, 4.0]}, "loss_p") == pytest.approx(2.0)


@pytest.mark.slow
def test_tiny_claims_run_resumes_and_reports(tmp_path, capsys):
    """Claim a at the tiny scale, 2 seeds, through the product's flows; a rerun skips every stage."""
    out = tmp_path / "claims"
    assert pc.main(["--scale", "tiny", "--seeds", "0", "1", "--claims", "a", "--out", str(out), "--no-reference"]) == 0
    result = json.loads((out / "claims.json").read_text())
    assert set(result["claims"]) == {"a"}
    stdout = capsys.readouterr().out  # the summary is the last JSON object printed
    printed = json.loads(stdout[stdout.rindex('{\n  "benchmark"') :])["claims"]["a"]["rows"]
    assert [r["over_control"] for r in printed] == [r["over_control"]["mean"] for r in result["claims"]["a"]["rows"]]
    claim = result["claims"]["a"]
    assert (out / claim["plot"]).stat().st_size > 1000
    rows = {r["value"]: r for r in claim["rows"]}
    assert set(rows) == {"S1", "S2", "S3", "S4"} and all(r["student"]["n"] == 2 for r in rows.values())
    # every level's student learns from the base cell's teacher: one teacher metric per seed
    assert len({tuple(r["teacher"]["values"]) for r in rows.values()}) == 1
    level = next(c for c in result["cells"] if c.startswith("level-"))
    linked = out / "seed-0" / level / "run" / "round-0" / "teacher" / "model.pt"
    assert linked.samefile(out / "seed-0" / "base" / "run" / "round-0" / "teacher" / "model.pt")
    assert "(a) Gain vs augmentation level" in (out / "report.md").read_text()
    # Every stage's outputs, by content and time: a rerun that skips every stage leaves them all as they are.
    outputs = sorted(p for p in out.rglob("*") if p.is_file() and p.parent.name in ("teacher", "pseudo", "student"))
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    assert any(p.name == "model.pt" for p in stamps) and any(p.name == "manifest.json" for p in stamps)
    assert pc.main(["--scale", "tiny", "--seeds", "0", "1", "--claims", "a", "--out", str(out), "--no-reference"]) == 0
    again = json.loads((out / "claims.json").read_text())
    assert again["claims"]["a"]["rows"] == claim["rows"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs} == stamps


def test_a_threshold_that_keeps_nothing_is_a_row_without_a_student():
    """A teacher that keeps no image at 0.7: no student, left out of the means, named in the report."""
    seeds = (0, 1)
    results = {c: {s: _res(20.0, 22.0 + s) for s in seeds} for c in ("base", "threshold-0.3")}
    nan = math.nan
    empty = {"teacher": 20.0, "control": 21.0, "student": nan, "gain": nan, "over_control": nan, "kept": 0}
    empty.update(labels=0, no_pseudo="kept no image")
    results["threshold-0.7"] = {s: {**_res(20.0, 20.0), "rounds": [empty]} for s in seeds}
    out = pc.aggregate(results, ["e"], "S2")
    rows = {r["value"]: r for r in out["e"]["rows"]}
    assert rows["0.7"]["no_pseudo"] == 2 and rows["0.7"]["student"]["n"] == 0
    assert math.isnan(rows["0.7"]["gain"]["mean"])
    assert out["e"]["best"] in ("0.3", "0.5") and out["e"]["holds"] is False
    result = {"family": "detection", "scale": "small", "seeds": list(seeds), "elapsed_s": 60.0, "metric": "AP"}
    out["e"]["plot"] = "claim-e.png"
    report = pc.report_markdown({**result, "claims": out})
    assert "| 0.7 | 20.00 ± 0.00 | 21.00 ± 0.00 | no student on 2 seed(s): no image kept |" in report
    # differences carry their sign, levels do not: the 0.3 row gains +2.50 over its teacher, +2.25 over its control
    assert "| 0.3 | 20.00 ± 0.00 | 20.25 ± 0.00 | 22.50 ± 0.71 | +2.25 ± 0.71 | +2.50 ± 0.71 |" in report


def test_the_report_names_rows_whose_teachers_are_below_the_regime():
    """The paper's claims are about teachers of >= 30 AP: a row below it is named, one above it is not."""
    seeds = (0, 1)
    results = {"base": {s: _res(35.0, 37.0) for s in seeds}}
    results.update({f"labels-{n}": {s: _res(t, t + 1.0) for s in seeds} for n, t in ((50, 18.0), (100, 31.0))})
    out = pc.aggregate(results, ["c"], "S2")
    out["c"]["plot"] = "claim-c.png"
    result = {"family": "detection", "scale": "regime", "seeds": list(seeds), "elapsed_s": 60.0, "metric": "AP"}
    report = pc.report_markdown({**result, "claims": out, "reference_step_s": [0.671, 0.9]})
    assert "Teachers in the paper's regime (>= 30 AP): not the row(s) 50," in report
    assert "(reference step before each: 0.671, 0.900 s)" in report
    results["labels-50"] = {s: _res(30.0, 31.0) for s in seeds}
    out = pc.aggregate(results, ["c"], "S2")
    out["c"]["plot"] = "claim-c.png"
    assert "Teachers in the paper's regime (>= 30 AP): all rows." in pc.report_markdown({**result, "claims": out})
