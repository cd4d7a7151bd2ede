"""Stage flows and the Noisy Student parent flow. They compose tasks only.

Each stage flow takes the run's config and a round index, reads its upstream's
outputs from the run directory's manifests, and skips itself when its own manifest
matches its inputs (tasks/rundir.py). So any stage can be rerun alone, from the CLI
or as a deployment, and a change of its parameters invalidates exactly the stages
after it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from configs import RunConfig, dump_config
from data import storage
from data.shards import expand_urls, shard_identities
from flows import artifacts
from tasks import runners, units
from tasks.families import get_family
from tasks.inputs import check_inputs
from tasks.labeling import add_stats, empty_stats, finished_shards, remove_temporaries
from tasks.rundir import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    file_digest,
    finished,
    invalidate,
    json_digest,
    read_manifest,
    write_manifest,
)
from tasks.runlock import holds_run_dir
from tasks.training import MODEL_FILE, resume_key

# ----------------------------------------------------------------------------- inputs


# Stage inputs hold each config section's `digest_view()`: the settings that decide
# the result. How a stage runs (processes, workers, logging; `run_setting` fields in
# configs/) stays out, so changing it neither restarts nor invalidates anything.


def teacher_inputs(cfg: RunConfig) -> dict:
    return {
        "stage": "teacher",
        "family": cfg.family,
        "data": cfg.data.digest_view(),
        "model": cfg.model.digest_view(),
        "train": cfg.teacher.digest_view(),
    }


# Content digests of the unlabeled shards, cached across stages and runs (data/shards.py).
SHARD_DIGESTS = "shard-digests.json"
ROUNDS_PLOT = "rounds.png"


def pseudo_inputs(cfg: RunConfig, teacher: dict, shards: list[str]) -> dict:
    return {
        "stage": "pseudo",
        "family": cfg.family,
        "teacher": teacher["digest"],
        "rule": cfg.pseudo.digest_view(),
        "image_size": cfg.data.image_size,
        "shards": shard_identities(shards, storage.join(cfg.out_dir, SHARD_DIGESTS)),
    }


def student_inputs(cfg: RunConfig, teacher: dict, pseudo: dict) -> dict:
    return {
        "stage": "student",
        "family": cfg.family,
        "data": cfg.data.digest_view(),
        "model": cfg.student_model.digest_view(),
        # student.model stands under "model", resolved (None: the teacher's architecture)
        "student": {k: v for k, v in cfg.student.digest_view().items() if k != "model"},
        "pseudo": pseudo["digest"],
        "teacher": teacher["digest"] if cfg.student.init == "teacher" else None,
    }


def teacher_outputs(cfg: RunConfig, round_index: int) -> dict:
    """The finished teacher of a round: round 0's teacher, else the previous student."""
    run = RunDir(cfg.out_dir)
    stage = run.stage(0, "teacher") if round_index == 0 else run.stage(round_index - 1, "student")
    m = read_manifest(stage)
    if m is None:
        raise RuntimeError(f"the teacher of round {round_index} ({stage}) has not finished; run that stage first")
    return m["outputs"]


def pseudo_outputs(cfg: RunConfig, round_index: int) -> dict:
    stage = RunDir(cfg.out_dir).stage(round_index, "pseudo")
    m = read_manifest(stage)
    if m is None:
        raise RuntimeError(f"pseudo-labels of round {round_index} ({stage}) are missing; run that stage first")
    return m["outputs"]


def _model_outputs(stage: Path, metrics: dict, metric: str) -> dict:
    return {
        "files": [MODEL_FILE, "metrics.json"],
        "checkpoint": str(stage / MODEL_FILE),
        "digest": file_digest(stage / MODEL_FILE),
        "metrics": metrics,
        "metric": metric,
    }


# ----------------------------------------------------------------------------- stages


@flow(name="teacher", flow_run_name="teacher")
@holds_run_dir
def teacher_flow(cfg: RunConfig) -> dict:
    """Train the round-0 teacher on human labels, evaluate it (skipped when up to date)."""
    logger = get_run_logger()
    stage = RunDir(cfg.out_dir).stage(0, "teacher")
    inputs = teacher_inputs(cfg)
    if done := finished(stage, inputs):
        logger.info("teacher is up to date (%s); skipped", stage)
        return done["outputs"]
    invalidate(stage)
    units.train_teacher(cfg, str(stage), json_digest(inputs), resume_key(inputs))
    metrics = units.evaluate(cfg, str(stage / MODEL_FILE))
    atomic_write_json(stage / "metrics.json", metrics)
    family = get_family(cfg.family)
    return finish(stage, inputs, _model_outputs(stage, metrics, family.metric))


def finish(stage: Path, inputs: dict, outputs: dict) -> dict:
    return write_manifest(stage, inputs, outputs)["outputs"]


# ----------------------------------------------------------------------------- labeling


@flow(name="pseudo-label", flow_run_name="pseudo-label-round-{round_index}")
@holds_run_dir
def pseudo_label_flow(cfg: RunConfig, round_index: int = 0) -> dict:
    """Label every unlabeled shard with the round's teacher, in tasks of
    `cfg.pseudo.chunk_size` shards each.

    The shards are spread over the task runner that `cfg.pseudo.runner` names (a
    bounded thread or process pool, or Dask), chosen at run time so that deployments
    honour it too. A shard whose sidecar json records this run's key is not labeled
    again, so a run killed mid-way resumes with the shards it had not finished.
    """
    logger = get_run_logger()
    family = get_family(cfg.family)
    stage = RunDir(cfg.out_dir).stage(round_index, "pseudo")
    teacher = teacher_outputs(cfg, round_index)
    shards = expand_urls(cfg.data.unlabeled_shards)[: cfg.pseudo.shard_limit]
    if not shards:
        raise ValueError("data.unlabeled_shards matches no shard")
    inputs = pseudo_inputs(cfg, teacher, shards)
    if removed := remove_temporaries(stage):  # this run holds the run directory (tasks/runlock.py)
        logger.info("removed %d temporary file(s) an interrupted run left in %s", len(removed), stage)
    if done := finished(stage, inputs):
        logger.info("pseudo-labels of round %d are up to date; skipped", round_index)
        return done["outputs"]
    invalidate(stage)
    storage.makedirs(stage)
    num_classes = family.num_classes(cfg.data)
    common = {k: v for k, v in inputs.items() if k != "shards"}
    keys = [json_digest({**common, "shard": ident}) for ident in inputs["shards"]]
    done, todo = finished_shards(stage, list(range(len(keys))), keys)
    per_shard = list(done.values())
    if per_shard:
        logger.info(
            "%d of %d shards were labeled by an earlier run; labeling the other %d",
            len(per_shard),
            len(shards),
            len(todo),
        )
    progress = artifacts.LabelingProgress(round_index, len(shards), finished=per_shard)
    if todo:
        with runners.labeling_runner(cfg.pseudo, cfg.device, logger) as runner:
            size = cfg.pseudo.chunk_size(len(todo))
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            logger.info("labeling %d shards in %d tasks of up to %d shards", len(todo), len(chunks), size)
            futures = [
                runner.submit(
                    units.label_shards,
                    parameters=dict(
                        cfg=cfg,
                        teacher_checkpoint=teacher["checkpoint"],
                        shards=[shards[i] for i in chunk],
                        indices=chunk,
                        keys=[keys[i] for i in chunk],
                        out_dir=str(stage),
                        num_classes=num_classes,
                    ),
                )
                for chunk in chunks
            ]
            for fut in as_completed(futures):
                for stats in fut.result():
                    per_shard.append(stats)
                    progress.advance(stats)
    per_shard.sort(key=lambda s: s["sidecar"])
    total = empty_stats(num_classes)
    for s in per_shard:
        total = add_stats(total, s)
    # Broken shards are final for their content; they are named again on every run.
    broken = [{"shard": s["shard"], "error": s["error"]} for s in per_shard if s.get("error")]
    for b in broken:
        logger.warning("broken shard %s, its readable records labeled: %s", b["shard"], b["error"])
    for s in per_shard:
        if s.get("empty_shards"):
            logger.warning("shard %s holds no records", s["shard"])
    names = family.class_names(cfg.data)
    artifacts.pseudo_stats(round_index, total, family.label_unit, names, family.stats_rows(total, family.label_unit))
    outputs = {
        "files": [s["sidecar"] for s in per_shard] + [s["sidecar"].replace(".tar", ".json") for s in per_shard],
        "pairs": [[s["shard"], str(stage / s["sidecar"])] for s in per_shard],
        "digest": json_digest(keys),
        "stats": total,
        "broken": broken,
    }
    logger.info(
        "round %d: %d images labeled, %d kept, %d labels, %d corrupt, %d broken shard(s) (%d records cut off)",
        round_index,
        total["images"],
        total["kept"],
        total["labels"],
        total["corrupt"],
        total["broken_shards"],
        total["lost_records"],
    )
    return finish(stage, inputs, outputs)


@flow(name="student", flow_run_name="student-round-{round_index}")
@holds_run_dir
def student_flow(cfg: RunConfig, round_index: int = 0) -> dict:
    """Train the noised student on human + pseudo labels, evaluate it."""
    logger = get_run_logger()
    stage = RunDir(cfg.out_dir).stage(round_index, "student")
    teacher = teacher_outputs(cfg, round_index)
    pseudo = pseudo_outputs(cfg, round_index)
    inputs = student_inputs(cfg, teacher, pseudo)
    if done := finished(stage, inputs):
        logger.info("student of round %d is up to date; skipped", round_index)
        return done["outputs"]
    if pseudo["stats"]["kept"] == 0:  # refused before anything of the stage is touched
        raise NoPseudoLabels(
            f"round {round_index}: the teacher kept no unlabeled image at pseudo.score_threshold="
            f"{cfg.pseudo.score_threshold} ({pseudo['stats']['images']} images labeled), so the student has no "
            "pseudo batch to draw; lower the threshold or train the teacher longer"
        )
    invalidate(stage)
    pairs = [tuple(p) for p in pseudo["pairs"]]
    units.train_student(cfg, str(stage), json_digest(inputs), pairs, teacher["checkpoint"], resume_key(inputs))
    metrics = units.evaluate(cfg, str(stage / MODEL_FILE))
    atomic_write_json(stage / "metrics.json", metrics)
    return finish(stage, inputs, _model_outputs(stage, metrics, get_family(cfg.family).metric))


class NoPseudoLabels(RuntimeError):
    """The pseudo-label stage kept nothing: a student cannot be trained on it."""


@flow(name="evaluate", flow_run_name="evaluate")
def evaluate_flow(cfg: RunConfig, checkpoint: str) -> dict:
    """Evaluate any saved model on the config's val split; shows a metrics table."""
    metrics = units.evaluate(cfg, checkpoint)
    artifacts.metrics_table_single(checkpoint, metrics)
    return metrics


# ----------------------------------------------------------------------------- rounds


@flow(name="noisy-student", flow_run_name="noisy-student")
@holds_run_dir
def noisy_student_flow(cfg: RunConfig) -> dict:
    """Teacher -> (pseudo-label -> student) x rounds; the student teaches the next round.

    `rounds: auto` runs rounds until one's student gains less than `min_gain` over its
    teacher (at most `max_rounds`). Writes <run>/config.yaml first and <run>/summary.json
    and report.md last; with several rounds also rounds.png, the metric per round, shown
    in the UI as the `rounds` artifact. Fails before any stage runs when inputs are
    missing, naming all of them (tasks/inputs.py).
    """
    check_inputs(cfg)
    t0 = time.perf_counter()
    run = RunDir(cfg.out_dir)
    storage.makedirs(run.root)
    atomic_write_bytes(run.config, dump_config(cfg).encode())
    family = get_family(cfg.family)
    teacher = teacher_flow(cfg)
    rounds = []
    auto = cfg.rounds == "auto"
    stopped = None
    for r in range(cfg.max_rounds if auto else cfg.rounds):
        pseudo = pseudo_label_flow(cfg, r)
        student = student_flow(cfg, r)
        stats = pseudo["stats"]
        rounds.append(
            {
                "round": r,
                "teacher_metrics": teacher["metrics"],
                "student_metrics": student["metrics"],
                "pseudo": {
                    "images": stats["images"],
                    "kept": stats["kept"],
                    "labels": stats["labels"],
                    "corrupt": stats["corrupt"],
                },
            }
        )
        artifacts.metrics_table(rounds, family.metric)
        teacher = student
        gain = student["metrics"][family.metric] - rounds[-1]["teacher_metrics"][family.metric]
        if auto and gain < cfg.min_gain:
            stopped = f"round {r} gained {gain:+.2f} {family.metric}, less than min_gain={cfg.min_gain:g}"
            get_run_logger().info("rounds: auto stops: %s", stopped)
            break
    if auto and stopped is None:
        stopped = f"max_rounds={cfg.max_rounds} reached"
    summary = {
        "family": family.name,
        "metric": family.metric,
        "rounds": rounds,
        "stopped": stopped,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "run_dir": str(run.root),
    }
    if len(rounds) > 1 or auto:
        artifacts.rounds_plot(summary, run.root / ROUNDS_PLOT)
    atomic_write_json(run.summary, summary)
    atomic_write_bytes(run.report, artifacts.report_markdown(summary).encode())
    return summary
