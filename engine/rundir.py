"""The run directory (docs/design.md, Run directory): stage folders, digests, manifests, atomic writes.

    <run>/config.yaml
    <run>/round-0/teacher/   model.pt, checkpoint.pt, metrics.json, train.log, manifest.json
    <run>/round-0/audit/     audit.json, pr.png, grid.jpg, manifest.json (with audit.split)
    <run>/round-0/pseudo/    labels-000000.tar, labels-000000.json, ..., manifest.json
    <run>/round-0/student/   model.pt, checkpoint.pt, metrics.json, train.log, manifest.json
    <run>/round-0/control/   the same files: the student's recipe on human labels only
    <run>/round-0/student-1/ ... one per soup ingredient (with soup.ingredients)
    <run>/round-0/soup/      soup.json, uniform/model.pt, greedy/model.pt, manifest.json
    <run>/summary.json, report.md

A stage writes `manifest.json` last. It records the digest of the stage's inputs
(config sections, upstream outputs) and the sha256 of every file the stage lists as
an output; a stage whose manifest matches its inputs, and whose files are as it wrote
them, is skipped; one that does not is recomputed, and since every downstream stage
includes its upstream's output digest in its own inputs, the stages after it are too.
A file cut off or changed after its stage finished is found before anything reads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from data import storage
from data.files import atomic_write

MANIFEST = "manifest.json"


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path) -> Any | None:
    """The JSON at a local path or URL; None when it is absent or not JSON."""
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(stage_dir: str | Path) -> dict | None:
    return read_json(storage.join(stage_dir, MANIFEST))


def damaged_file(stage_dir: str | Path, manifest: dict) -> str | None:
    """The first output file of a finished stage that is missing, or whose bytes are not
    the ones its manifest recorded (cut off, rewritten), as a phrase naming it; None
    when every file is as the stage wrote it."""
    for name, digest in manifest.get("file_digests", {}).items():
        path = storage.join(stage_dir, name)
        if not storage.exists(path):
            return f"{path} is missing"
        if file_digest(path) != digest:
            return f"{path} was cut off or changed after the stage wrote it"
    return None


class StageNotFinished(RuntimeError):
    """A stage needs the outputs of one that has not finished; run that one first."""


class DamagedOutput(RuntimeError):
    """A finished stage's output file is missing or changed; rerun that stage."""


def finished(stage_dir: str | Path, inputs: dict, log=None) -> dict | None:
    """The stage's manifest if it finished with exactly these inputs and its files are as
    it wrote them; else None. `log(line)` hears why a matching stage must recompute."""
    m = read_manifest(stage_dir)
    if not m or m.get("inputs_digest") != json_digest(inputs):
        return None
    if (damage := damaged_file(stage_dir, m)) is not None:
        if log is not None:
            log(f"{damage}: recomputing the stage")
        return None
    return m


def finished_outputs(stage_dir: str | Path, what: str) -> dict:
    """The outputs of an upstream stage a stage is about to use: DamagedOutput naming the
    file when one is missing or changed, StageNotFinished when the stage has not finished."""
    m = read_manifest(stage_dir)
    if m is None:
        raise StageNotFinished(f"{what} ({stage_dir}) has not finished; run that stage first")
    if (damage := damaged_file(stage_dir, m)) is not None:
        raise DamagedOutput(f"{what}: {damage}; rerun that stage")
    return m["outputs"]


def write_manifest(stage_dir: str | Path, inputs: dict, outputs: dict) -> dict:
    """Record a finished stage. `outputs["files"]` lists its files (relative to the
    stage folder), whose sha256 the manifest records; `outputs["digest"]` is what
    downstream stages depend on."""
    m = {
        "inputs_digest": json_digest(inputs),
        "inputs": inputs,
        "outputs": outputs,
        "file_digests": {f: file_digest(storage.join(stage_dir, f)) for f in outputs.get("files", [])},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(storage.join(stage_dir, MANIFEST), m)
    return m


def invalidate(stage_dir: str | Path) -> None:
    """Forget that a stage finished (its outputs stay until it is recomputed)."""
    storage.remove(storage.join(stage_dir, MANIFEST))


class RunDir:
    """Paths of one run's stages: Paths, or UPaths of a run at an object-storage URL."""

    def __init__(self, root: str | Path):
        self.root = storage.path(root)

    def stage(self, round_index: int, name: str) -> Path:
        return self.root / f"round-{round_index}" / name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
