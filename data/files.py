"""Atomic file writes: a crash never leaves a partial file under its final name.

Built on `data.storage` (paths and URLs), which imports nothing from here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from data import storage

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space (or quota) was left for `path`; nothing partial is left under its name."""

    def __init__(self, path: str | os.PathLike, free_bytes: int | None = None):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.free_bytes = str(path), free_bytes

    def __str__(self) -> str:
        free = "" if self.free_bytes is None else f" ({self.free_bytes / 2**20:.1f} MiB free there)"
        return (
            f"no space left on the device while writing {self.path}{free}; the file was not written and "
            "nothing partial is left under its name: free some space and rerun to continue"
        )

    def __reduce__(self):
        return type(self), (self.path, self.free_bytes)


def _no_space(err: BaseException) -> bool:
    """Whether `err` or an error it came from is ENOSPC/EDQUOT (torch.save, for one,
    raises a RuntimeError from the OSError of the failed write)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path | str:
    """Call `write(f)` on a hidden temporary file beside `path`, then rename it into place.

    The temporary name ends in `.tmp`, so a leftover never matches a shard pattern; on
    any error it is removed and the error re-raised. When the filesystem is full (or
    over quota) the error is a DiskFullError naming `path`, and an older file under
    `path` is left as it was. Parent folders are created. An object-storage URL
    (`s3://...`) is uploaded whole instead, and appears only when complete
    (`data.storage.write_remote`); the URL is returned.
    """
    if storage.is_remote(path):
        return storage.write_remote(storage.text(path), write)
    path = storage.local(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if _no_space(err):
            raise DiskFullError(path, _free_bytes(path.parent)) from err
        raise
    return path


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file or object whole to `dst`, atomically: a hard link where both are on a
    local disk and links work, else the bytes through `atomic_write`."""
    if not storage.is_remote(src) and not storage.is_remote(dst):
        s, d = storage.local(src), storage.local(dst)
        tmp = d.with_name(f".{d.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(s, tmp)
            os.replace(tmp, d)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    with storage.open_read(src) as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


class AppendLog:
    """A text file that grows by lines: appended in place on a local disk; on object
    storage (which cannot append) the whole object is rewritten with each line, so it is
    always whole. Lines already there (a resumed stage) are kept."""

    def __init__(self, p: str | os.PathLike):
        self.p = p
        self.remote = storage.is_remote(p)
        if self.remote:
            try:
                self.text = storage.read_bytes(p).decode()
            except FileNotFoundError:
                self.text = ""
        else:
            storage.local(p).parent.mkdir(parents=True, exist_ok=True)

    def write_line(self, line: str) -> None:
        if not self.remote:
            with open(storage.local(self.p), "a") as f:
                f.write(line + "\n")
            return
        self.text += line + "\n"
        data = self.text.encode()
        atomic_write(self.p, lambda f: f.write(data))
