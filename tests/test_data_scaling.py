"""benchmarks/data_scaling.py: the pool's fractions, one shared teacher, the report and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_module import ROOT, load_benchmark

ds = load_benchmark("data_scaling")


def test_a_fraction_must_be_whole_shards(tmp_path):
    with pytest.raises(ValueError, match="fraction 0.3 of 2000 images is not a whole number of 250-image shards"):
        ds.run_cell(tmp_path, 0, 0.3, 2.0, None, quick=False)
    assert ds.cell_name(0.25) == "pool-0.25x" and ds.cell_name(2.0) == "pool-2x"


@pytest.mark.slow
def test_a_tiny_run_shares_one_teacher_and_plots_the_gains(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_scaling.py"), "--quick", "--fractions", "1", "2"]
    cmd += ["--no-reference", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]  # a failure shows the script's own error
    report = json.loads((tmp_path / "scaling.json").read_text())
    cells = report["cells"]
    assert [c["pool_images"] for c in cells] == [48, 96]  # 3 and 6 shards of 16
    assert cells[0]["teacher"] == cells[1]["teacher"]  # one teacher for every cell
    assert cells[0]["control"] == cells[1]["control"]  # and one control: it reads no pool
    # each figure is rounded to 0.01 on its own, so a difference of two rounded figures and
    # the rounded difference can part by up to 0.015 (student 1.784, teacher 3.536: gain -1.752 is
    # written -1.75, while 1.78 - 3.54 = -1.76)
    for c in cells:
        assert c["gain"] == pytest.approx(c["student"] - c["teacher"], abs=0.0151)
        assert c["over_control"] == pytest.approx(c["student"] - c["control"], abs=0.0151)
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 96 (2x) |" in (tmp_path / "report.md").read_text()
    # the smaller cell trained no teacher of its own: its teacher folder is the larger cell's, hard-linked
    for stage in ("teacher", "control"):
        small, large = (Path(tmp_path, f"pool-{f}x", "run", "round-0", stage, "model.pt") for f in ("1", "2"))
        assert small.stat().st_ino == large.stat().st_ino
