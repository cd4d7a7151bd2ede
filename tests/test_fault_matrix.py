"""benchmarks/fault_matrix.py: every case names tests that exist, and a row reports what they observed."""

import subprocess
import sys

from tests.benchmark_module import ROOT, load_benchmark


def load():
    return load_benchmark("fault_matrix")


def test_every_case_names_tests_that_exist():
    fm = load()
    nodes = sorted({t for c in fm.CASES for t in c.tests})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("[", 1)[0] for line in done.stdout.splitlines() if "::" in line}
    assert set(nodes) <= collected, set(nodes) - collected
    assert len({c.name for c in fm.CASES}) == len(fm.CASES)


def test_rows_report_failures_skips_and_slow_tests():
    fm = load()
    case = fm.Case("c", "e", ("tests/a.py::test_x", "tests/a.py::test_y"))
    ok = {"tests/a.py::test_x": [("test_x", "passed", "")], "tests/a.py::test_y": [("test_y[1]", "passed", "")]}
    assert fm.observed(case, ok, fast=False) == "pass (2 tests)"
    bad = {**ok, "tests/a.py::test_y": [("test_y[1]", "passed", ""), ("test_y[2]", "failed", "AssertionError: 3")]}
    assert fm.observed(case, bad, fast=False) == "FAIL: test_y[2]: AssertionError: 3"
    assert (
        fm.observed(case, {"tests/a.py::test_x": ok["tests/a.py::test_x"]}, fast=True)
        == "pass (1 tests); 1 not run (slow)"
    )
    assert fm.observed(case, {}, fast=True) == "not run (slow; drop --fast)"
    skipped = {"tests/a.py::test_x": [("test_x", "skipped", "cannot mount")]}
    assert fm.observed(case, skipped, fast=False).startswith("not run: skipped (cannot mount)")
