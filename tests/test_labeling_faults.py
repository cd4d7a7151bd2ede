"""Faults while labeling: the disk fills while a shard's sidecar is written (on a real,
small tmpfs: root is needed to mount one, the test is skipped where mounting fails)."""

import json
import os
from pathlib import Path

import pytest

from data.files import DiskFullError
from flows import stages
from tests.labeling_setup import labeling_config, with_out_dir
from tests.test_disk_full import small_fs  # noqa: F401 (a fixture)
from tests.test_resume import complete_tar


def fill_to(folder: Path, leave: int) -> Path:
    """Allocate <folder>/filler so that about `leave` bytes stay free."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


@pytest.mark.slow  # about 30 s: six shard labelings on this machine
def test_a_full_disk_while_writing_a_sidecar(prefect_harness, tmp_path, small_fs):  # noqa: F811
    """The run directory is on an 8 MiB tmpfs that is full but for 32 KiB once the
    teacher is in place: room for the run lock and the shard digests, not for a
    sidecar tar (about 64 KiB here). The stage fails with an
    error naming the sidecar and the full disk, no final name holds a partial file and
    no temporary file is left; once space is freed, a rerun completes."""
    base = labeling_config(tmp_path / "world", ["pseudo.runner=thread", "pseudo.max_workers=1"])
    cfg = with_out_dir(base, small_fs / "run")
    pseudo = Path(cfg.out_dir) / "round-0" / "pseudo"
    filler = fill_to(small_fs, leave=32 << 10)

    with pytest.raises(DiskFullError) as err:
        stages.pseudo_label_flow(cfg, 0)
    message = str(err.value)
    assert "no space left" in message and str(pseudo / "labels-0000") in message
    assert not list(pseudo.glob(".labels-*")) and not list(pseudo.glob("*.tmp"))
    for tar in pseudo.glob("labels-*.tar"):  # any sidecar under its final name is whole
        complete_tar(tar)
    assert not (pseudo / "manifest.json").exists()

    filler.unlink()
    out = stages.pseudo_label_flow(cfg, 0)
    manifest = json.loads((pseudo / "manifest.json").read_text())
    assert manifest["outputs"]["stats"] == out["stats"] and out["stats"]["images"] == 48
    assert sorted(p.name for p in pseudo.glob("labels-*.tar")) == [f"labels-{i:06d}.tar" for i in range(3)]
    for tar in pseudo.glob("labels-*.tar"):
        complete_tar(tar)
