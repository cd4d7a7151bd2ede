"""benchmarks/ratios.py and benchmarks/gpu_check.py run end to end on the quick demo's toy
model (their figures mean nothing at this size: the tests check the scripts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_module import ROOT, load_benchmark


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ratios_quick_measures_every_pair(tmp_path: Path):
    args = ["--quick", "--steps", "2", "--warmup", "1", "--shards", "3", "--per-shard", "4", "--out", str(tmp_path)]
    run("ratios.py", *args)
    r = json.loads((tmp_path / "ratios.json").read_text())
    for name in ("labeling", "teacher", "student", "memory"):
        assert r[name]["ratio"] > 0, (name, r[name])
        op, goal = r[name]["goal"].split()
        assert r[name]["met"] == (r[name]["ratio"] >= float(goal) if op == ">=" else r[name]["ratio"] <= float(goal))
    assert r["labeling"]["pipeline_img_s"] > 0 and len(r["labeling"]["bare_img_s"]) == 2
    assert r["memory"]["labeling_peak_rss_mib_3_shards"] >= 100 and r["training_rss"]["last_mib"] > 0
    # The student trained on the labeling pair's sidecars: one per shard.
    assert len(list((tmp_path / "labels").glob("labels-*.tar"))) == 3


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_the_toy_model(tmp_path: Path):
    done = run("gpu_check.py", "--device", "cpu", "--quick", "--steps", "2", "--per-shard", "4", "--out", str(tmp_path))
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(r) >= {"bf16", "fp32", "capacity"}
    assert r["bf16"]["labeling_img_s"] > 0 and r["fp32"]["teacher_img_s"] > 0
    assert done.stdout.strip().splitlines()[-1] == r["capacity"]
    assert r["capacity"].startswith("1.7M images on 8 GPUs:") and r["capacity"].endswith("hours of labeling")


def test_capacity_line_arithmetic():
    gpu_check = load_benchmark("gpu_check")
    # 1.8M images at 100 img/s on 5 GPUs: 3600 s = 1.0 h
    assert gpu_check.capacity_line(1_800_000, 5, 100.0) == "1.8M images on 5 GPUs: 1.0 hours of labeling"


@pytest.mark.slow
def test_profile_step_quick_reports_the_engine_phases(tmp_path: Path):
    run("profile_step.py", "--quick", "--steps", "2", "--warmup", "2", "--out", str(tmp_path))
    r = json.loads((tmp_path / "profile.json").read_text())
    for stage in ("teacher", "student"):
        phases = r[stage]["ms_per_step"]
        assert set(phases) == {"next_batch", "forward_and_loss", "backward", "guard", "optimizer_step"}
        assert phases["forward_and_loss"] > 0 and phases["backward"] > 0, phases
        assert r[stage]["wall_s_per_step"] > 0 and len(r[stage]["top_self_cpu_ms_per_step"]) == 10
        assert (tmp_path / f"{stage}-trace.json").stat().st_size > 1000


@pytest.mark.slow
def test_teacher_step_gap_quick_times_every_variant_in_every_round(tmp_path: Path):
    run("teacher_step_gap.py", "--quick", "--rounds", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path))
    r = json.loads((tmp_path / "teacher-step-gap.json").read_text())
    for variant in ("bare_one", "bare_many", "stage", "stage_w0"):
        rounds = r["seconds_per_step"][variant]["rounds"]
        assert len(rounds) == 2 and all(x > 0 for x in rounds), (variant, rounds)
    one, stage = r["seconds_per_step"]["bare_one"]["rounds"], r["seconds_per_step"]["stage"]["rounds"]
    # the ratios come from the unrounded times: equal to the rounded ones' within rounding
    assert r["ratios"]["bare_one / stage"]["min"] == pytest.approx(min(a / b for a, b in zip(one, stage)), rel=0.02)
