"""Prefect tasks: one unit of work each, wrapping the stage engines.

Tasks take configs and paths and return small metadata (paths, counts, metrics),
never tensors. Caching is ours (manifests, per-shard stats), not Prefect's, so every
task uses `NO_CACHE` and persists no result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from configs import RunConfig
from data import storage
from data.files import AppendLog, DiskFullError
from engine import audit, labeling, soups, training
from engine.devices import DeviceError, bound_device, check_device
from engine.loop import device_settings

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a run context (a worker process without Prefect's context)
        return logging.getLogger("noisy_student")


def _train_log(stage_dir: Path):
    """Log to the Prefect run and append to <stage>/train.log."""
    logger = _logger()
    lines = AppendLog(storage.join(stage_dir, "train.log"))

    def log(msg: str) -> None:
        logger.info(msg)
        lines.write_line(msg)

    return log


@task(name="train-teacher", **_TASK)
def train_teacher(cfg: RunConfig, stage_dir: str, key: str, resume_key: str | None = None) -> dict:
    return training.train_teacher(cfg, stage_dir, key, log=_train_log(stage_dir), resume_key=resume_key)


@task(name="train-student", **_TASK)
def train_student(
    cfg: RunConfig,
    stage_dir: str,
    key: str,
    pseudo_pairs: list[tuple[str, str]],
    teacher_checkpoint: str,
    resume_key: str | None = None,
) -> dict:
    return training.train_student(
        cfg, stage_dir, key, pseudo_pairs, teacher_checkpoint, log=_train_log(stage_dir), resume_key=resume_key
    )


@task(name="train-control", **_TASK)
def train_control(cfg: RunConfig, stage_dir: str, key: str, teacher_checkpoint: str, resume_key: str | None = None):
    return training.train_control(
        cfg, stage_dir, key, teacher_checkpoint, log=_train_log(stage_dir), resume_key=resume_key
    )


@task(name="evaluate", **_TASK)
def evaluate(cfg: RunConfig, checkpoint: str, split: str = "val", results_dir: str | None = None) -> dict[str, float]:
    metrics = training.evaluate_checkpoint(cfg, checkpoint, split, results_dir)
    _logger().info("%s metrics of %s: %s", split, checkpoint, {k: round(v, 2) for k, v in metrics.items()})
    return metrics


@task(name="audit", **_TASK)
def audit_teacher(cfg: RunConfig, teacher_checkpoint: str, stage_dir: str, drawn_threshold: float | None) -> dict:
    return audit.audit_teacher(cfg, teacher_checkpoint, stage_dir, drawn_threshold, log=_logger().info)


@task(name="soup", **_TASK)
def make_soups(cfg: RunConfig, ingredients: list[dict], stage_dir: str) -> dict:
    return soups.make_soups(cfg, ingredients, stage_dir, log=_logger().info)


def _worth_retrying(task, task_run, state) -> bool:
    """A full disk stays full and a worker's unusable device stays unusable: a retry
    would fail again."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not isinstance(err, (DiskFullError, DeviceError))


def _label_one(
    cfg: RunConfig,
    teacher_checkpoint: str,
    shard: str,
    index: int,
    out_dir: str,
    key: str,
    num_classes: int,
    device: str,
) -> dict:
    """Label one shard on `device` into <out_dir>/labels-NNNNNN.{tar,json}; returns its
    stats (a small dict) with the device they were made on."""
    out_tar, out_json = labeling.sidecar_paths(out_dir, index)
    family, model = training.shared_model(teacher_checkpoint, device)
    stats = labeling.label_shard(
        family, model, shard, out_tar, out_json, cfg.data.image_size, cfg.pseudo, num_classes, key
    )
    _logger().info(
        "shard %s on %s: %d images, %d kept, %d labels, %d corrupt",
        shard,
        device,
        stats["images"],
        stats["kept"],
        stats["labels"],
        stats["corrupt"],
    )
    return {**stats, "device": device}


def _chunk_name(parameters: dict) -> str:
    """label-shards-<first index>-x<shards>: the task run's name in the UI."""
    indices = parameters["indices"]
    return f"label-shards-{indices[0]:06d}-x{len(indices)}" if indices else "label-shards-empty"


# One task labels a chunk of shards (`pseudo.shards_per_task`), one after the other: a
# task run costs the Prefect server a few API calls and the runner a submit, so 10,000
# one-shard tasks would spend more on orchestration than a small shard's labeling and
# crowd the server. Each shard's sidecar is final as soon as it is written, so an
# attempt that raises (a flaky read, a CUDA error) is retried twice in place, redoing
# only the shards of the chunk it had not finished. A worker that dies mid-chunk (killed,
# out of memory) takes its attempt with it: the Dask scheduler runs the task again on
# another worker, at most `distributed.scheduler.allowed-failures` times (3 by default),
# then fails it with KilledWorker. Either way the next attempt starts by removing what
# the failed one left.
@task(
    name="label-shards",
    task_run_name=_chunk_name,
    retries=2,
    retry_condition_fn=_worth_retrying,
    **_TASK,
)
def label_shards(
    cfg: RunConfig,
    teacher_checkpoint: str,
    shards: list[str],
    indices: list[int],
    keys: list[str],
    out_dir: str,
    num_classes: int,
) -> list[dict]:
    """Label `shards` (shard `indices[i]` with key `keys[i]`) in order on the device this
    worker is bound to (the run's device on a worker bound to none); their stats, each
    labeled one's naming the device. The temporary files an earlier attempt left for
    these shards are removed first: only this task writes them."""
    if removed := labeling.remove_temporaries(out_dir, indices):
        _logger().info("removed %d temporary file(s) of a failed attempt: %s", len(removed), removed[:3])
    # A retried attempt keeps the shards the failed one finished (before the teacher is loaded).
    done, _ = labeling.finished_shards(out_dir, indices, keys)
    if done:
        _logger().info("%d shard(s) of this task were finished by an earlier attempt; skipped", len(done))
    device = bound_device(cfg.device)
    check_device(device)
    device_settings(device, cfg.cudnn_benchmark, cfg.host_allocator)
    return [
        done[index]
        if index in done
        else _label_one(cfg, teacher_checkpoint, shard, index, out_dir, key, num_classes, device)
        for shard, index, key in zip(shards, indices, keys, strict=True)
    ]
