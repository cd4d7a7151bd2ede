"""What a run reads from outside its run directory, checked before any stage runs.

`check_inputs(cfg, stages)` raises one `MissingInputsError` naming every missing
annotation file, image folder, VOC list or mask folder, unlabeled shard and weights
file, each with its config key. So a run with two wrong paths fails at once and once,
instead of in the stage that first reads the second one, possibly hours later.
Unlabeled shards at object-storage URLs are checked with one listing per folder;
other remote files (`s3://` annotations, `pipe:` shards) are left to their readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from configs import ConfigError, RunConfig
from data import storage
from data.shards import expand_urls
from engine.families import check_config, data_layout
from engine.rundir import file_digest, json_digest

STAGES = ("teacher", "audit", "pseudo-label", "student", "control", "soup", "evaluate")
SHARDS_NAMED = 5  # missing shards named one by one; the rest are counted


class MissingInputsError(ConfigError):
    """Inputs of a run that do not exist; `missing` holds (config key, path, reason)."""

    def __init__(self, missing: list[tuple[str, str, str]]):
        self.missing = missing
        lines = [f"  {key}: {path} ({why})" for key, path, why in missing]
        super().__init__(f"{len(missing)} missing input(s), nothing was run:\n" + "\n".join(lines))


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _absent_shards(shards: list[str]) -> list[str]:
    """The shards that do not exist, in order: a stat per local file, one listing per
    object-storage folder (not a request per object); `pipe:` commands are not checked."""
    listed: dict[str, set[str]] = {}
    absent = []
    for s in shards:
        if s.startswith("pipe:"):
            continue
        if not storage.is_remote(s):
            if not Path(s).is_file():
                absent.append(s)
            continue
        folder = s.rsplit("/", 1)[0]
        if folder not in listed:
            listed[folder] = set(storage.list_names(folder))
        if storage.name(s) not in listed[folder]:
            absent.append(s)
    return absent


def missing_inputs(cfg: RunConfig, stages: Iterable[str] = STAGES) -> list[tuple[str, str, str]]:
    """(config key, path, reason) of each input of `stages` that does not exist."""
    stages = set(stages)
    unknown = stages - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    missing: list[tuple[str, str, str]] = []

    def need(key: str, path: str | Path | None, kind: str) -> None:
        if path is None or _remote(str(path)):
            return
        p = Path(path)
        if not (p.is_file() if kind == "file" else p.is_dir()):
            missing.append((key, str(path), f"not a {kind}" if p.exists() else f"no such {kind}"))

    check_config(cfg)
    layout = data_layout(cfg)
    data = cfg.data
    splits = []
    if stages & {"teacher", "student", "control", "evaluate"}:  # the training stages evaluate too
        splits = (["train"] if stages & {"teacher", "student", "control"} else []) + ["val"]
    if (
        ("audit" in stages and cfg.audit.split == "holdout")
        or ("soup" in stages and cfg.soup.ingredients)
        or ("student" in stages and cfg.rounds == "auto")
    ):
        splits.append("holdout")
    for split in splits:
        for key, path, kind in layout.split_inputs(data, split):
            need(key, path, kind)
    if "teacher" in stages:
        need("model.backbone_checkpoint", cfg.model.backbone_checkpoint, "file")
    if stages & {"student", "control"}:
        key = "student.model" if cfg.student.model else "model"
        need(f"{key}.backbone_checkpoint", cfg.student_model.backbone_checkpoint, "file")
        if cfg.student.init == "checkpoint":
            need("student.init_checkpoint", cfg.student.init_checkpoint, "file")
    if "pseudo-label" in stages:
        shards = expand_urls(data.unlabeled_shards)[: cfg.pseudo.shard_limit]
        if not shards:
            missing.append(("data.unlabeled_shards", repr(data.unlabeled_shards), "matches no shard"))
        absent = _absent_shards(shards)
        for s in absent[:SHARDS_NAMED]:
            missing.append(("data.unlabeled_shards", s, "no such shard"))
        if len(absent) > SHARDS_NAMED:
            missing.append(
                (
                    "data.unlabeled_shards",
                    f"{len(absent) - SHARDS_NAMED} more",
                    f"{len(absent)} of {len(shards)} shards are missing",
                )
            )
    # one line per path, in the order found
    seen, unique = set(), []
    for item in missing:
        if item[1] not in seen:
            seen.add(item[1])
            unique.append(item)
    return unique


def split_digest(cfg: RunConfig, split: str) -> str:
    """A digest of the files that list a labeled split's images and labels (the layout's
    `split_files`): a stage choosing on a split reruns when its labels change."""
    return json_digest([file_digest(f) for f in data_layout(cfg).split_files(cfg.data, split)])


def check_inputs(cfg: RunConfig, stages: Iterable[str] = STAGES) -> None:
    """Raise one MissingInputsError naming every missing input of `stages`."""
    if missing := missing_inputs(cfg, stages):
        raise MissingInputsError(missing)
