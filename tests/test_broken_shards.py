"""Broken unlabeled shards never fail the pseudo-label stage: a shard cut off mid-member,
an empty file, a file that is no tar, a tar with zero members, records whose member is
not an image. Every readable record is labeled, the rest is counted in the shard's json
and in the manifest, a warning names the shard, and a rerun takes the result as final."""

import json
import logging
import tarfile
from pathlib import Path

import pytest

from data.shards import expand_urls, iter_shard, write_shard
from flows import stages
from tests.labeling_setup import labeling_config
from tests.test_resume import label_shard_runs
from tests.test_shards import big_png

GOOD_IMAGES = 5  # records left whole before the cut


def make_broken_shards(good_shard: str, folder: Path) -> dict[str, Path]:
    """One shard per case, built from the records of a good image shard."""
    folder.mkdir()
    records = list(iter_shard(good_shard))
    shards = {name: folder / f"{name}.tar" for name in ("cut", "empty", "garbage", "zero", "notimage")}
    write_shard(shards["cut"], records)
    with tarfile.open(shards["cut"]) as tar:
        (victim,) = [m for m in tar.getmembers() if m.name.startswith(records[GOOD_IMAGES][0] + ".")]
    shards["cut"].write_bytes(shards["cut"].read_bytes()[: victim.offset_data + victim.size // 2])
    shards["empty"].write_bytes(b"")
    shards["garbage"].write_bytes(b"this is no tar " * 200)
    write_shard(shards["zero"], [])
    write_shard(
        shards["notimage"],
        [
            records[0],
            ("notes", {"txt": b"not an image"}),
            ("fake", {"jpg": b"\xff\xd8 not a jpeg"}),
            ("huge", {"png": big_png()}),  # above the pixel limit: skipped, never decoded
            records[1],
        ],
    )
    return shards


@pytest.fixture
def broken_run(prefect_harness, tmp_path, caplog):
    cfg = labeling_config(tmp_path)
    shards = make_broken_shards(expand_urls(cfg.data.unlabeled_shards)[0], tmp_path / "broken")
    pattern = str(tmp_path / "broken" / "{cut,empty,garbage,zero,notimage}.tar")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"unlabeled_shards": pattern})})
    with caplog.at_level(logging.WARNING):
        out = stages.pseudo_label_flow(cfg, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return cfg, shards, out, warnings


def shard_json(cfg, index: int) -> dict:
    return json.loads((Path(cfg.out_dir) / "round-0" / "pseudo" / f"labels-{index:06d}.json").read_text())


def test_broken_shards_are_labeled_as_far_as_they_read_and_counted(broken_run):
    cfg, shards, out, warnings = broken_run
    per_shard = {name: shard_json(cfg, i) for i, name in enumerate(shards)}
    cut = per_shard["cut"]
    assert cut["images"] + cut["corrupt"] == GOOD_IMAGES and cut["kept"] > 0
    assert (cut["broken_shards"], cut["lost_records"]) == (1, 1)
    assert str(shards["cut"]) in cut["error"] and "unexpected end of data" in cut["error"]
    for name in ("empty", "garbage"):
        s = per_shard[name]
        assert (s["images"], s["broken_shards"], s["lost_records"]) == (0, 1, 0) and str(shards[name]) in s["error"]
    zero = per_shard["zero"]
    assert (zero["images"], zero["broken_shards"], zero["empty_shards"]) == (0, 0, 1) and "error" not in zero
    notimage = per_shard["notimage"]
    assert (notimage["images"], notimage["corrupt"], notimage["too_large"], notimage["broken_shards"]) == (2, 2, 1, 0)

    manifest = json.loads((Path(cfg.out_dir) / "round-0" / "pseudo" / "manifest.json").read_text())
    total = manifest["outputs"]["stats"]
    assert total == out["stats"]
    assert total["images"] == cut["images"] + 2 and total["corrupt"] == cut["corrupt"] + 2
    assert total["too_large"] == 1
    assert (total["broken_shards"], total["lost_records"], total["empty_shards"]) == (3, 1, 1)
    assert [b["shard"] for b in out["broken"]] == [str(shards[n]) for n in ("cut", "empty", "garbage")]
    # Sidecars of the broken shards hold what was labeled, and they end properly.
    assert len(list(iter_shard(Path(cfg.out_dir) / "round-0" / "pseudo" / "labels-000000.tar"))) == cut["kept"]
    for name in ("cut", "empty", "garbage", "zero"):
        assert any(str(shards[name]) in w for w in warnings), name
    assert any("notes" in w and str(shards["notimage"]) in w for w in warnings)


def test_a_rerun_takes_broken_shards_as_final(broken_run):
    cfg, shards, out, _ = broken_run
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    (pseudo / "manifest.json").unlink()  # as if killed before the manifest
    stamps = {p.name: p.stat().st_mtime_ns for p in pseudo.glob("labels-*")}
    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    again = state.result()
    assert label_shard_runs(state.state_details.flow_run_id) == 0  # nothing is labeled again
    assert {p.name: p.stat().st_mtime_ns for p in pseudo.glob("labels-*")} == stamps
    assert again["stats"] == out["stats"] and again["broken"] == out["broken"]
