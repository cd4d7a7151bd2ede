"""One run at a time per run directory: `<run>/run.lock`, held with flock(2).

The lock is the open file itself, so the kernel lets it go when the holding process
ends, however it ends: a lock left by a killed run is free, and the next run takes it
over (its record of pid, host and start time stays in the file until then, so the
takeover is reported). A run that finds the lock held refuses at once, naming the
holder. Locking is per process and reentrant: the CLI holds the run directory before
its flows start, and each stage flow holds it too (for deployments and `serve`),
which in the same process only counts up.

flock works on local filesystems and on NFS (Linux maps it onto NFS byte-range locks).
Object stores have no locks: a run directory at a URL (`s3://...`) is locked on this
host only, by a local lock file named after the URL (`lock_path`); two hosts must not
run the same remote run directory at once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data import storage

LOCK_FILE = "run.lock"
_READ_TRIES = 20  # a holder writes its record right after taking the lock

_held: dict[str, list] = {}  # resolved run directory -> [fd, depth]: this process's locks
_guard = threading.Lock()
logger = logging.getLogger("noisy_student")


class RunDirLocked(RuntimeError):
    """The run directory is held by another run; `holder` is its record (pid, host, started)."""

    def __init__(self, run_dir: str | Path, holder: dict):
        self.run_dir, self.holder = str(run_dir), holder
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        super().__init__(
            f"run directory {run_dir} is in use by another run ({who}{since}); "
            f"wait for it to finish or stop it (its lock: {lock_path(run_dir)})"
        )

    def __reduce__(self):
        return type(self), (self.run_dir, self.holder)


def _record(fd: int) -> dict:
    data = os.pread(fd, 4096, 0)
    try:
        rec = json.loads(data) if data.strip() else {}
    except json.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}


def lock_path(root: str | Path) -> Path:
    """`<root>/run.lock`; for a run directory at a URL, a file in this host's temp folder."""
    if storage.is_remote(root):
        digest = hashlib.sha256(str(root).rstrip("/").encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "noisy-student-locks" / f"{digest}.lock"
    return Path(root) / LOCK_FILE


def _acquire(root: str | Path) -> int:
    lock = lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = {}
        for _ in range(_READ_TRIES):
            if holder := _record(fd):
                break
            time.sleep(0.01)
        os.close(fd)
        raise RunDirLocked(root, holder) from None
    except BaseException:
        os.close(fd)
        raise
    stale = _record(fd)
    if stale:
        logger.warning(
            "run directory %s: took over the lock of pid %s on host %s (started %s), which no longer runs",
            root,
            stale.get("pid"),
            stale.get("host"),
            stale.get("started"),
        )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # an empty lock file: free, and no takeover to report
    finally:
        os.close(fd)  # drops the flock


@contextmanager
def hold_run_dir(root: str | Path) -> Iterator[None]:
    """Hold `root`'s lock for the block; RunDirLocked at once if another run holds it."""
    key = str(root).rstrip("/") if storage.is_remote(root) else str(Path(root).resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(root), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(entry[0])


def holds_run_dir(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a flow function whose first argument is the run's config: it runs
    holding `cfg.out_dir` (under `@flow`, so Prefect sees the function's signature)."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with hold_run_dir(cfg.out_dir):
            return fn(cfg, *args, **kwargs)

    # Resolved here: Prefect evaluates string annotations in the globals of the function
    # it is given, which are this module's, not the flow's.
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    wrapper.__annotations__ = typing.get_type_hints(fn)
    return wrapper
