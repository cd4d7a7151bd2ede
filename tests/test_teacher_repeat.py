"""benchmarks/teacher_repeat.py: the weights digest, and a real repeat at the quick size."""

import pytest
import torch

from tests.benchmark_module import load_benchmark

teacher_repeat = load_benchmark("teacher_repeat")


def save(path, state):
    torch.save({"family": "detection", "model_cfg": {}, "state": state}, path)
    return path


def test_digest_is_over_every_bit_in_name_order(tmp_path):
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3), "b": torch.ones(2)}
    digest, count = teacher_repeat.weights_digest(save(tmp_path / "a.pt", a))
    assert count == 3
    reordered = {k: a[k] for k in ("b", "n", "w")}
    assert teacher_repeat.weights_digest(save(tmp_path / "b.pt", reordered))[0] == digest
    one_ulp = dict(a, b=torch.nextafter(a["b"], torch.full_like(a["b"], 2.0)))
    assert teacher_repeat.weights_digest(save(tmp_path / "c.pt", one_ulp))[0] != digest
    transposed = dict(a, w=a["w"].t())  # same values, other layout: the bytes in logical order differ
    assert teacher_repeat.weights_digest(save(tmp_path / "d.pt", transposed))[0] != digest


def test_known_digests_are_sha256():
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in teacher_repeat.KNOWN)


@pytest.mark.slow
def test_quick_teacher_repeats_bit_for_bit(tmp_path):
    out = teacher_repeat.main(["--quick", "--steps", "3", "--runs", "2", "--out", str(tmp_path / "rep")])
    assert out["repeats"], out["runs"]
    assert len(out["runs"]) == 2 and out["runs"][0]["tensors"] > 100
    assert out["machine"]["cores"] >= 1
    assert out["same_as"] is None  # the recorded digests are of the full preset's 60 steps
    # run again into the same folder: trained afresh, not skipped as up to date
    stamp = (tmp_path / "rep" / "run-0" / "round-0" / "teacher" / "model.pt").stat().st_mtime_ns
    again = teacher_repeat.main(["--quick", "--steps", "3", "--runs", "1", "--out", str(tmp_path / "rep")])
    assert again["runs"][0]["digest"] == out["runs"][0]["digest"]
    assert (tmp_path / "rep" / "run-0" / "round-0" / "teacher" / "model.pt").stat().st_mtime_ns != stamp
