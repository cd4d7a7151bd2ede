"""Shards, sidecars and labeling on object storage: a real S3 API (moto's server on
loopback, spoken to over HTTP by s3fs), through the same calls as local files."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch

from data import storage
from data.shards import ShardReadError, expand_urls, iter_shard, iter_with_sidecar, shard_identities, write_shard
from data.world import WorldSpec, write_world
from engine.labeling import finished_shards, label_shard, remove_temporaries, sidecar_paths

GOOD = [(f"k{i}", {"jpg": bytes([i + 1]) * (700 + 300 * i), "json": b"{}"}) for i in range(4)]


def test_paths_and_urls_are_told_apart():
    assert storage.is_remote("s3://b/x.tar") and storage.is_remote("gs://b/x.tar")
    assert not storage.is_remote("/data/x.tar") and not storage.is_remote("file:///data/x.tar")
    assert not storage.is_remote("runs/a://b")  # a colon inside a local path is no scheme
    assert str(storage.local("file:///data/x.tar")) == "/data/x.tar"
    assert storage.join("s3://b/run/", "round-0", "pseudo") == "s3://b/run/round-0/pseudo"
    assert storage.name("s3://b/run/labels-000001.tar") == "labels-000001.tar"


def test_a_shard_roundtrips_through_s3(bucket):
    url = f"{bucket}/pool/pool-000000.tar"
    assert write_shard(url, GOOD) == 4
    assert list(iter_shard(url)) == GOOD
    assert storage.list_names(f"{bucket}/pool") == ["pool-000000.tar"]


def test_a_failed_upload_leaves_no_object_and_keeps_the_older_one(bucket):
    url = f"{bucket}/s.tar"

    def failing():
        yield GOOD[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_shard(url, failing())
    assert not storage.exists(url)
    write_shard(url, GOOD)
    before = storage.read_bytes(url)
    with pytest.raises(ValueError, match="bad.key"):
        write_shard(url, [("ok", {"jpg": b"1"}), ("bad.key", {"jpg": b"2"})])
    assert storage.read_bytes(url) == before


def test_a_cut_off_object_yields_its_whole_records_then_names_the_lost_one(bucket, tmp_path):
    write_shard(tmp_path / "s.tar", GOOD)
    data = (tmp_path / "s.tar").read_bytes()
    url = f"{bucket}/cut.tar"
    with fsspec.open(url, "wb") as f:
        f.write(data[: data.index(bytes([3]) * 100) + 50])  # inside k2's image bytes
    got = []
    with pytest.raises(ShardReadError) as err:
        for record in iter_shard(url):
            got.append(record)
    assert got == GOOD[:2] and err.value.lost_key == "k2" and url in str(err.value)


def test_object_identities_follow_content_and_name_missing_objects(bucket):
    url = f"{bucket}/s.tar"
    write_shard(url, GOOD)
    first = shard_identities([url])[0]
    assert first["path"] == url and first["size"] == len(storage.read_bytes(url)) and first["etag"]
    assert shard_identities([url]) == [first]  # stable while the object is unchanged
    write_shard(url, GOOD[:3])
    assert shard_identities([url])[0]["etag"] != first["etag"]
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        shard_identities([url, f"{bucket}/gone.tar"])


def test_sidecars_on_s3_join_their_image_shard_in_lockstep(bucket):
    write_shard(f"{bucket}/img.tar", GOOD)
    write_shard(f"{bucket}/side.tar", [("k1", {"lab": b"1"}), ("k3", {"lab": b"3"})])
    got = [(k, side) for k, _, side in iter_with_sidecar(f"{bucket}/img.tar", f"{bucket}/side.tar")]
    assert got == [("k1", {"lab": b"1"}), ("k3", {"lab": b"3"})]


def test_labeling_reads_an_s3_shard_and_writes_its_sidecar_there(bucket, tmp_path):
    from configs import PseudoLabelConfig
    from engine.families import get_family

    from .conftest import tiny_model_config

    world = write_world(tmp_path / "w", WorldSpec(), seed=1, n_train=2, n_val=2, n_unlabeled=6, per_shard=6)
    shard = f"{bucket}/pool-000000.tar"
    fsspec.filesystem("s3").put(expand_urls(world.unlabeled_pattern)[0], shard.removeprefix("s3://"))
    family = get_family("detection")
    torch.manual_seed(0)
    model = family.build_model(tiny_model_config()).eval()
    rule = PseudoLabelConfig(score_threshold=0.0, max_boxes=3, batch_size=4)
    out_tar, out_json = sidecar_paths(f"{bucket}/run/pseudo", 0)
    stats = label_shard(family, model, shard, out_tar, out_json, 128, rule, 3, key="k")
    assert stats["images"] == 6 and stats["kept"] == 6 and stats["sidecar"] == "labels-000000.tar"
    keys = [k for k, _, _ in iter_with_sidecar(shard, out_tar)]
    assert len(keys) == 6 and storage.exists(out_json)
    # finished: the recorded key (read back from the bucket) marks it done; another key does not
    assert finished_shards(f"{bucket}/run/pseudo", [0], ["k"]) == ({0: stats}, [])
    assert finished_shards(f"{bucket}/run/pseudo", [0], ["other"]) == ({}, [0])
    assert remove_temporaries(f"{bucket}/run/pseudo") == []


def test_missing_s3_shards_are_named_before_any_stage_runs(bucket, small_world):
    from configs import RunConfig
    from engine.inputs import missing_inputs

    from .conftest import world_data

    write_shard(f"{bucket}/pool-000000.tar", GOOD)
    cfg = RunConfig(data=world_data(small_world, unlabeled_shards=f"{bucket}/pool-{{000000..000002}}.tar"))
    assert missing_inputs(cfg, ["pseudo-label"]) == [
        ("data.unlabeled_shards", f"{bucket}/pool-000001.tar", "no such shard"),
        ("data.unlabeled_shards", f"{bucket}/pool-000002.tar", "no such shard"),
    ]


@pytest.mark.slow
def test_the_quick_demo_labels_a_pool_on_s3(bucket, tmp_path, prefect_harness):
    import json

    from flows.cli import main
    from flows.demo import demo_config

    _, _ = demo_config(tmp_path, quick=True)  # writes the quick world under tmp_path/world
    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.put(str(tmp_path / f"world/unlabeled/pool-{i:06d}.tar"), f"{bucket[5:]}/pool/pool-{i:06d}.tar")
    pool = f"{bucket}/pool/pool-{{000000..000002}}.tar"
    assert main(["demo", "--quick", "--out", str(tmp_path), "--set", f"data.unlabeled_shards={pool}"]) == 0
    manifest = json.loads((tmp_path / "run/round-0/pseudo/manifest.json").read_text())
    shards = manifest["inputs"]["shards"]
    assert [s["path"] for s in shards] == [f"{bucket}/pool/pool-{i:06d}.tar" for i in range(3)]
    assert all(s["etag"] for s in shards) and manifest["outputs"]["stats"]["images"] == 48
    assert (tmp_path / "run/round-0/student/model.pt").exists()


@pytest.mark.slow
def test_the_whole_quick_demo_runs_on_s3_and_a_rerun_skips_every_stage(bucket, prefect_harness, capsys):
    import json

    from flows.cli import main

    out = f"{bucket}/demo"
    assert main(["demo", "--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert (
        "teacher   control   student" in printed
        and "(AP; control: the student's recipe on human labels only)" in printed
    )
    names = set(fsspec.filesystem("s3").find(out[5:]))
    prefix = out[5:]
    for rel in (
        "world/world.json",
        "world/unlabeled/pool-000000.tar",
        "run/config.yaml",
        "run/summary.json",
        "run/report.md",
        "run/round-0/teacher/model.pt",
        "run/round-0/teacher/checkpoint.pt",
        "run/round-0/teacher/train.log",
        "run/round-0/pseudo/labels-000002.tar",
        "run/round-0/pseudo/manifest.json",
        "run/round-0/student/model.pt",
        "run/round-0/student/metrics.json",
    ):
        assert f"{prefix}/{rel}" in names, rel
    assert not [n for n in names if n.endswith(".tmp")]  # nothing but whole objects
    summary = json.loads(storage.read_bytes(f"{out}/run/summary.json"))
    assert summary["rounds"][0]["pseudo"]["images"] == 48
    stamps = {
        s: json.loads(storage.read_bytes(f"{out}/run/round-0/{s}/manifest.json"))["finished_at"]
        for s in ("teacher", "pseudo", "student")
    }
    assert main(["demo", "--quick", "--out", out]) == 0  # resumes from the bucket: nothing to do
    assert {
        s: json.loads(storage.read_bytes(f"{out}/run/round-0/{s}/manifest.json"))["finished_at"] for s in stamps
    } == stamps


def test_local_shards_keep_their_digest_cache_in_a_remote_run_directory(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shard(tmp_path / "s.tar", GOOD)
    cache = f"{bucket}/run/shard-digests.json"
    (first,) = shard_identities([tmp_path / "s.tar"], cache)
    assert json.loads(storage.read_bytes(cache))[first["path"]]["sha256"] == first["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]  # nothing written beside it
