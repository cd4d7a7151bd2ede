"""Disk full while writing a checkpoint or a manifest: a clear error, no partial file under
a final name, the older file kept; a rerun after space is freed completes.

The fast tests simulate ENOSPC; the others fill a small tmpfs for real (they need root
to mount one and are skipped where mounting fails).
"""

import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from configs import TrainConfig
from data.files import DiskFullError, atomic_write
from engine.loop import CHECKPOINT, fit
from engine.rundir import MANIFEST, atomic_torch_save, atomic_write_json, finished, write_manifest


def no_space(*_args, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_enospc_on_fsync_keeps_the_older_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"AP": 1.0})
    monkeypatch.setattr("data.files.os.fsync", no_space)
    with pytest.raises(DiskFullError) as err:
        atomic_write_json(path, {"AP": 2.0})
    assert str(path) in str(err.value) and "no space left" in str(err.value)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert json.loads(path.read_text()) == {"AP": 1.0}
    assert leftovers(tmp_path) == []


class FullAfter(io.RawIOBase):
    """A file that takes `room` bytes, then fails with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            no_space()
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


def test_enospc_inside_torch_save_is_a_disk_full_error(tmp_path, monkeypatch):
    """torch.save turns the failed write into a RuntimeError; it is still reported as disk full."""
    real = os.fdopen
    monkeypatch.setattr("data.files.os.fdopen", lambda fd, mode: FullAfter(real(fd, mode, buffering=0), 4096))
    path = tmp_path / CHECKPOINT
    with pytest.raises(DiskFullError, match=CHECKPOINT):
        atomic_torch_save({"w": torch.zeros(100_000)}, path)
    assert not path.exists() and leftovers(tmp_path) == []


def test_other_errors_pass_through(tmp_path):
    def broken(f):
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- on a real tmpfs


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs at <tmp>/fs."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write <folder>/filler until at most `leave` bytes are free."""
    filler = folder / "filler"
    chunk = bytes(64 * 1024)
    try:
        with open(filler, "wb", buffering=0) as f:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave:
                f.write(chunk)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    return filler


def batches(start):
    g = torch.Generator().manual_seed(start)
    while True:
        x = torch.randn(4, 512, generator=g)
        yield {"images": x, "y": x}


def step_loss(model, batch):
    loss = ((model(batch["images"]) - batch["y"]) ** 2).mean()
    return loss, {"loss": loss.item()}


def test_checkpoint_on_a_full_disk(small_fs):
    """A 3 MiB checkpoint (512x512 weights and AdamW moments): the one of step 2 is written,
    then the disk fills; step 4's fails clearly, step 2's stays, and a rerun after the
    space is freed resumes from it and completes."""
    stage = small_fs / "teacher"
    cfg = TrainConfig(steps=6, batch_size=4, checkpoint_every=2, warmup_steps=0, lr=1e-3)
    fillers = []

    def fill_after_2(step, logs):
        if step == 2:
            fillers.append(fill(small_fs, leave=1 << 20))

    torch.manual_seed(0)
    with pytest.raises(DiskFullError) as err:
        fit(
            stage,
            nn.Linear(512, 512),
            batches,
            step_loss,
            cfg,
            "cpu",
            key="k",
            log=lambda m: None,
            on_step=fill_after_2,
        )
    assert str(stage / CHECKPOINT) in str(err.value)
    assert sorted(p.name for p in stage.iterdir()) == [CHECKPOINT]  # no temporary file beside it
    assert torch.load(stage / CHECKPOINT, weights_only=True)["step"] == 2

    fillers[0].unlink()
    msgs = []
    result = fit(stage, nn.Linear(512, 512), batches, step_loss, cfg, "cpu", key="k", log=msgs.append)
    assert result["resumed_from"] == 2 and result["step"] == 6
    assert torch.load(stage / CHECKPOINT, weights_only=True)["step"] == 6


def test_manifest_on_a_full_disk(small_fs):
    stage = small_fs / "pseudo"
    stage.mkdir()
    (stage / "labels-000000.tar").write_bytes(b"x")
    inputs, outputs = {"stage": "pseudo"}, {"files": ["labels-000000.tar"], "digest": "d"}
    filler = fill(small_fs)
    with pytest.raises(DiskFullError, match=MANIFEST):
        write_manifest(stage, inputs, outputs)
    assert sorted(p.name for p in stage.iterdir()) == ["labels-000000.tar"]
    assert finished(stage, inputs) is None  # the stage counts as not done

    filler.unlink()
    write_manifest(stage, inputs, outputs)
    assert finished(stage, inputs)["outputs"] == outputs


def test_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from flows import cli

    def full(args):
        atomic_write_json(tmp_path / "run" / "config.yaml", {})

    monkeypatch.setattr("data.files.os.fsync", no_space)
    monkeypatch.setattr(cli, "_dispatch", full)
    assert cli.main(["run", "demo-quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noisy-student: no space left") and "config.yaml" in err[0], err
