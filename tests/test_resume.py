"""Shard-level resume: a labeling run killed mid-way leaves only complete files under
final names, and its rerun labels just the shards it had not finished."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId, FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL

from configs import dump_config
from data.shards import expand_urls, iter_shard
from engine.families import get_family
from engine.labeling import add_stats, empty_stats
from flows import stages
from tests.labeling_setup import labeling_config
from tests.test_shards import same_size_rewrite

NUM_SHARDS = 12  # 4 images each: a shard takes a fraction of a second, the run several seconds
KILL_AFTER = 2  # finished shards


def complete_tar(path: Path) -> list[str]:
    """Member names of a tar that was written to its end (else AssertionError)."""
    data = path.read_bytes()
    # tarfile closes an archive with two zero blocks and pads it to whole blocks
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024), f"{path.name} is truncated"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for m in members:
            assert len(tar.extractfile(m).read()) == m.size
    return [m.name for m in members]


def check_sidecar(family, tar: Path, stats: dict, num_classes: int) -> None:
    """The tar holds what its json counts: one record per kept image, the same labels."""
    complete_tar(tar)
    records = list(iter_shard(tar))
    assert len(records) == stats["kept"], tar.name
    recount = empty_stats(num_classes)
    for _, rec in records:
        recount = add_stats(recount, family.label_stats(family.decode(rec[family.sidecar_ext]), num_classes))
    assert recount["labels"] == stats["labels"] and recount["class_counts"] == stats["class_counts"], tar.name
    assert stats["images"] + stats["corrupt"] == len(list(iter_shard(stats["shard"])))


def label_shard_runs(flow_run_id) -> int:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sum(r.name.startswith("label-shards-") for r in runs)


def test_killed_labeling_resumes_with_the_unfinished_shards(prefect_harness, tmp_path):
    cfg = labeling_config(
        tmp_path,
        ["pseudo.runner=thread", "pseudo.max_workers=1", "pseudo.batch_size=4"],
        n_unlabeled=4 * NUM_SHARDS,
        per_shard=4,
    )
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "stage", "pseudo-label", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(pseudo.glob("labels-*.json"))) < KILL_AFTER:
            assert proc.poll() is None, f"the labeling run exited early (code {proc.returncode})"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    family = get_family(cfg.family)
    num_classes = family.num_classes(cfg.data)
    done = {p.stem: json.loads(p.read_text()) for p in sorted(pseudo.glob("labels-*.json"))}
    assert KILL_AFTER <= len(done) < NUM_SHARDS, "the kill did not land mid-way"
    assert not (pseudo / "manifest.json").exists()
    # No partial file under a final name: every tar is whole, every json matches its tar.
    for tar in pseudo.glob("labels-*.tar"):
        complete_tar(tar)
    for stem, stats in done.items():
        check_sidecar(family, pseudo / f"{stem}.tar", stats, num_classes)
    stamps = {p.name: p.stat().st_mtime_ns for stem in done for p in pseudo.glob(f"{stem}.*")}

    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    out = state.result()
    # Only the unfinished shards ran; the finished ones kept their files.
    assert label_shard_runs(state.state_details.flow_run_id) == NUM_SHARDS - len(done)
    assert {name: (pseudo / name).stat().st_mtime_ns for name in stamps} == stamps
    per_shard = [json.loads(p.read_text()) for p in sorted(pseudo.glob("labels-*.json"))]
    assert len(per_shard) == NUM_SHARDS
    for stats in per_shard:
        check_sidecar(family, pseudo / stats["sidecar"], stats, num_classes)
    # The manifest's totals are the sum of its shards'.
    manifest = json.loads((pseudo / "manifest.json").read_text())
    total = empty_stats(num_classes)
    for stats in per_shard:
        total = add_stats(total, stats)
    assert manifest["outputs"]["stats"] == out["stats"] == total
    assert total["images"] == 4 * NUM_SHARDS and total["kept"] > 0
    assert sorted(manifest["outputs"]["files"]) == sorted(
        [f"labels-{i:06d}.{ext}" for i in range(NUM_SHARDS) for ext in ("tar", "json")]
    )


@pytest.mark.parametrize("damage", ["json-missing", "json-other-key", "tar-missing"])
def test_a_shard_is_relabeled_unless_its_json_records_the_key(prefect_harness, tmp_path, damage):
    cfg = labeling_config(tmp_path, ["pseudo.shard_limit=2"])
    stages.pseudo_label_flow(cfg, 0)
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    (pseudo / "manifest.json").unlink()  # as if killed before the manifest
    tar, js = pseudo / "labels-000001.tar", pseudo / "labels-000001.json"
    reference = tar.read_bytes()
    match damage:
        case "json-missing":
            js.unlink()
        case "json-other-key":
            js.write_text(json.dumps({**json.loads(js.read_text()), "key": "another teacher"}))
        case "tar-missing":
            tar.unlink()
    kept = (pseudo / "labels-000000.tar").stat().st_mtime_ns
    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    state.result()
    assert label_shard_runs(state.state_details.flow_run_id) == 1
    assert (pseudo / "labels-000000.tar").stat().st_mtime_ns == kept
    assert tar.read_bytes() == reference and json.loads(js.read_text())["key"] != "another teacher"


def test_leftover_temporary_files_are_removed_by_the_next_run(prefect_harness, tmp_path):
    cfg = labeling_config(tmp_path, ["pseudo.shard_limit=2"])
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    pseudo.mkdir(parents=True)
    # what a run killed while writing shard 1's tar and shard 0's json leaves behind
    leftovers = [pseudo / ".labels-000001.tar.k1ll3d.tmp", pseudo / ".labels-000000.json.zz9x_a.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    others = [pseudo / "notes.txt", pseudo / ".other.tmp"]  # not ours: kept
    for p in others:
        p.write_bytes(b"keep")
    stages.pseudo_label_flow(cfg, 0)
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_bytes() == b"keep" for p in others)
    assert not list(pseudo.glob(".labels-*"))
    # also when the stage is up to date and skipped
    leftovers[0].write_bytes(b"partial")
    stages.pseudo_label_flow(cfg, 0)
    assert not leftovers[0].exists()


def test_a_failed_attempt_is_retried_in_place_and_a_full_disk_is_not(prefect_harness, tmp_path, monkeypatch):
    import errno

    from prefect.states import Failed

    from data.files import DiskFullError
    from engine import labeling
    from tasks import units

    cfg = labeling_config(tmp_path, ["pseudo.shard_limit=2", "pseudo.max_workers=1"])
    write, attempts = labeling.write_shard, []

    def flaky_write(path, records):  # the first attempt fails after writing a record
        attempts.append(Path(path).name)

        def then_fail():
            for i, record in enumerate(records):
                if i == 1 and len(attempts) == 1:
                    raise OSError(errno.EIO, "Input/output error")
                yield record

        return write(path, then_fail())

    monkeypatch.setattr(labeling, "write_shard", flaky_write)
    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    state.result()
    assert attempts == ["labels-000000.tar", "labels-000000.tar", "labels-000001.tar"]
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    assert sorted(p.name for p in pseudo.iterdir()) == sorted(
        ["manifest.json"] + [f"labels-{i:06d}.{ext}" for i in range(2) for ext in ("json", "tar")]
    )
    assert units.label_shards.retries == 2  # bounded
    assert not units._worth_retrying(None, None, Failed(data=DiskFullError(pseudo / "labels-000000.tar")))
    assert units._worth_retrying(None, None, Failed(data=OSError(errno.EIO, "Input/output error")))


def test_a_regenerated_shard_of_the_same_size_is_relabeled(prefect_harness, tmp_path):
    cfg = labeling_config(tmp_path, ["pseudo.shard_limit=2"])
    stages.pseudo_label_flow(cfg, 0)
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    shard = expand_urls(cfg.data.unlabeled_shards)[1]
    old = dict(iter_shard(pseudo / "labels-000001.tar"))
    kept = (pseudo / "labels-000000.tar").stat().st_mtime_ns
    k0, k1 = [k for k, _ in iter_shard(shard)][:2]
    assert old[k0] != old[k1]
    same_size_rewrite(shard)  # images of k0 and k1 swapped; size and mtime as before

    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    state.result()
    assert label_shard_runs(state.state_details.flow_run_id) == 1
    assert (pseudo / "labels-000000.tar").stat().st_mtime_ns == kept
    new = dict(iter_shard(pseudo / "labels-000001.tar"))
    assert (new[k0], new[k1]) == (old[k1], old[k0])  # the labels moved with the images


def test_progress_starts_from_resumed_shards_and_updates_sparingly(prefect_harness, monkeypatch):
    from prefect import flow

    from flows import artifacts

    updates = []
    update = artifacts.update_progress_artifact
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda *a, **k: updates.append(a[1]) or update(*a, **k))

    @flow
    def label_eight(resumed: int) -> list[float]:
        progress = artifacts.LabelingProgress(7, 8, finished=[{"images": 4}] * resumed, min_interval_s=3600)
        seen = [read_progress(progress.id)]
        for _ in range(8 - resumed):
            progress.advance({"images": 4})
        return seen + [read_progress(progress.id)]

    assert label_eight(2) == [25.0, 100.0]
    assert updates == [100.0]  # only the last shard's advance reached the API


def read_progress(artifact_id) -> float:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    return float(artifact.data)


def test_remove_temporaries_of_some_shards_keeps_the_others(tmp_path):
    from engine.labeling import remove_temporaries

    names = [".labels-000001.tar.a.tmp", ".labels-000002.json.b.tmp", ".labels-000010.tar.c.tmp", "labels-000001.tar"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_temporaries(tmp_path, [1, 10])
    assert sorted(p.name for p in removed) == [".labels-000001.tar.a.tmp", ".labels-000010.tar.c.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".labels-000002.json.b.tmp", "labels-000001.tar"]
    assert remove_temporaries(tmp_path / "missing") == []
