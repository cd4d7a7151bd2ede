"""Stage flows and the Noisy Student parent flow. They compose tasks only.

Each stage flow takes the run's config and a round index, reads its upstream's
outputs from the run directory's manifests, and skips itself when its own manifest
matches its inputs (engine/rundir.py). So any stage can be rerun alone, from the CLI
or as a deployment, and a change of its parameters invalidates exactly the stages
after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from configs import ConfigError, RunConfig, build_config, dump_config
from data import storage
from data.shards import expand_urls, shard_identities
from engine import audit, soups
from engine.families import get_family, has_holdout
from engine.inputs import check_inputs, split_digest
from engine.labeling import finished_shards, pool_outputs, remove_temporaries
from engine.rundir import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    file_digest,
    finished,
    finished_outputs,
    invalidate,
    json_digest,
    read_manifest,
    write_manifest,
)
from engine.runlock import holds_run_dir
from engine.training import MODEL_FILE, resume_key
from flows import artifacts
from tasks import runners, units

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


def audit_inputs(cfg: RunConfig, teacher: dict, data_digest: str) -> dict:
    return {
        "stage": "audit",
        "family": cfg.family,
        "teacher": teacher["digest"],
        "audit": cfg.audit.digest_view(),
        # the rule's other settings decide the labels; the grid draws the rule's threshold
        "rule": {k: v for k, v in cfg.pseudo.digest_view().items() if k != "score_threshold"},
        "drawn_threshold": cfg.pseudo.score_threshold,
        "image_size": cfg.data.image_size,
        "data": data_digest,
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


# The student's settings that concern only its pseudo part, which the control does not have.
PSEUDO_PART = ("model", "pseudo_ratio", "alpha", "normalize_loss", "loss_ema_decay")


def control_inputs(cfg: RunConfig, teacher: dict) -> dict:
    """The student's inputs without the pseudo-labels: the control does not wait for
    labeling, and a new threshold or teacher rule leaves a finished control valid."""
    return {
        "stage": "control",
        "family": cfg.family,
        "data": cfg.data.digest_view(),
        "model": cfg.student_model.digest_view(),
        "student": {k: v for k, v in cfg.student.digest_view().items() if k not in PSEUDO_PART},
        "teacher": teacher["digest"] if cfg.student.init == "teacher" else None,
    }


def located(stage: Path, outputs: dict) -> dict:
    """A stage's outputs with the paths its manifest stores relative to the run directory
    (a model's `checkpoint`, the pseudo-label `pairs`' sidecars) joined to where the run
    directory is now: a run directory works from any working directory, moved or copied."""
    root = stage.parent.parent  # <run>/round-N/<stage>
    out = dict(outputs)
    if "checkpoint" in out:
        out["checkpoint"] = str(storage.join(root, out["checkpoint"]))
    if "pairs" in out:
        out["pairs"] = [[shard, str(storage.join(root, sidecar))] for shard, sidecar in out["pairs"]]
    return out


def in_run(stage: Path, name: str) -> str:
    """`name` in `stage`, relative to the run directory, as a manifest stores it."""
    return f"{storage.name(stage.parent)}/{storage.name(stage)}/{name}"


def teacher_outputs(cfg: RunConfig, round_index: int) -> dict:
    """The finished teacher of a round: round 0's teacher, else the previous student."""
    run = RunDir(cfg.out_dir)
    stage = run.stage(0, "teacher") if round_index == 0 else run.stage(round_index - 1, "student")
    return located(stage, finished_outputs(stage, f"the teacher of round {round_index}"))


def audit_outputs(cfg: RunConfig, round_index: int) -> dict:
    return finished_outputs(RunDir(cfg.out_dir).stage(round_index, "audit"), f"the audit of round {round_index}")


def labeling_rule(cfg: RunConfig, round_index: int) -> RunConfig:
    """`cfg` with the round's pseudo-label threshold as a number: `auto` becomes the
    F1-maximizing threshold of the round's audit."""
    if cfg.pseudo.score_threshold != "auto":
        return cfg
    threshold = audit_outputs(cfg, round_index)["f1_threshold"]
    return cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update={"score_threshold": threshold})})


def pseudo_outputs(cfg: RunConfig, round_index: int) -> dict:
    stage = RunDir(cfg.out_dir).stage(round_index, "pseudo")
    return located(stage, finished_outputs(stage, f"the pseudo-label stage of round {round_index}"))


PREDICTIONS_DIR = "predictions"  # a training stage's val predictions, in its folder
EVALUATION_DIR = "evaluation"  # `stage evaluate`'s, beside the checkpoint it evaluated


def run_stage(
    what: str, stage: Path, inputs: dict, work: Callable[[], dict], refuse: Callable[[], None] | None = None
) -> dict:
    """The bookkeeping of every stage, in one place: skip when the stage's manifest
    matches `inputs` and its files are as it wrote them; else call `refuse()` (which may
    raise before anything of the stage is touched), forget the old manifest, call
    `work()` for the outputs and record them (engine/rundir.py)."""
    logger = get_run_logger()
    if done := finished(stage, inputs, log=lambda line: logger.warning("%s: %s", what, line)):
        logger.info("%s is up to date (%s); skipped", what, stage)
        return located(stage, done["outputs"])
    if refuse is not None:
        refuse()
    invalidate(stage)
    return located(stage, write_manifest(stage, inputs, work())["outputs"])


def trained_model(cfg: RunConfig, stage: Path, train: Callable[[], object]) -> Callable[[], dict]:
    """The work of a training stage: `train()`, then the model evaluated on val, its
    predictions written under `<stage>/predictions/` for other tools (the family's format)."""

    def work() -> dict:
        train()
        predictions = storage.join(stage, PREDICTIONS_DIR)
        metrics = units.evaluate(cfg, str(stage / MODEL_FILE), "val", storage.text(predictions))
        atomic_write_json(stage / "metrics.json", metrics)
        written = [f"{PREDICTIONS_DIR}/{name}" for name in storage.list_names(predictions)]
        return {
            "files": [MODEL_FILE, "metrics.json", *written],
            "checkpoint": in_run(stage, MODEL_FILE),
            "digest": file_digest(stage / MODEL_FILE),
            "metrics": metrics,
            "metric": get_family(cfg.family).metric,
        }

    return work


# ----------------------------------------------------------------------------- stages


@flow(name="teacher", flow_run_name="teacher")
@holds_run_dir
def teacher_flow(cfg: RunConfig) -> dict:
    """Train the round-0 teacher on human labels, evaluate it (skipped when up to date)."""
    stage = RunDir(cfg.out_dir).stage(0, "teacher")
    inputs = teacher_inputs(cfg)
    train = lambda: units.train_teacher(cfg, str(stage), json_digest(inputs), resume_key(inputs))  # noqa: E731
    return run_stage("teacher", stage, inputs, trained_model(cfg, stage, train))


# ----------------------------------------------------------------------------- audit


@flow(name="audit", flow_run_name="audit-round-{round_index}")
@holds_run_dir
def audit_flow(cfg: RunConfig, round_index: int = 0) -> dict:
    """Label `audit.images` held-out images with the round's teacher, score the labels
    against their ground truth over a sweep of thresholds and recommend two (engine/audit.py).

    Writes audit.json, pr.png and grid.jpg in the stage folder and shows them in the
    `pseudo-audit-round-N` artifact. `pseudo.score_threshold: auto` labels the pool at
    this audit's F1 threshold.
    """
    if cfg.audit.split is None:
        raise ValueError("audit.split is None: set audit.split=holdout (or val) to audit the pseudo-labels")
    stage = RunDir(cfg.out_dir).stage(round_index, "audit")
    teacher = teacher_outputs(cfg, round_index)
    inputs = audit_inputs(cfg, teacher, split_digest(cfg, cfg.audit.split))

    def work() -> dict:
        drawn = None if cfg.pseudo.score_threshold == "auto" else cfg.pseudo.score_threshold
        report = units.audit_teacher(cfg, teacher["checkpoint"], str(stage), drawn)
        artifacts.audit(
            round_index, report, storage.read_bytes(stage / audit.PR_PLOT), storage.read_bytes(stage / audit.GRID)
        )
        drawn_rows = audit.at(report, report["drawn_threshold"])["all"]
        get_run_logger().info(
            "audit of round %d: F1 threshold %g (F1 %.3f), precision >= %g from %s; at %g: precision %s, recall %s",
            round_index,
            report["f1_threshold"],
            report["f1"],
            report["precision_target"],
            report["precision_threshold"],
            report["drawn_threshold"],
            drawn_rows["precision"],
            drawn_rows["recall"],
        )
        return {
            "files": [audit.REPORT, audit.PR_PLOT, audit.GRID],
            "f1_threshold": report["f1_threshold"],
            "f1": report["f1"],
            "precision_threshold": report["precision_threshold"],
            "at_drawn": {"threshold": report["drawn_threshold"], **drawn_rows},
        }

    return run_stage(f"audit of round {round_index}", stage, inputs, work)


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
    stage = RunDir(cfg.out_dir).stage(round_index, "pseudo")
    teacher = teacher_outputs(cfg, round_index)
    if (rule := labeling_rule(cfg, round_index)) is not cfg:
        cfg = rule
        logger.info("pseudo.score_threshold=auto: the audit's F1 threshold %g", cfg.pseudo.score_threshold)
    shards = expand_urls(cfg.data.unlabeled_shards)[: cfg.pseudo.shard_limit]
    if not shards:
        raise ValueError("data.unlabeled_shards matches no shard")
    inputs = pseudo_inputs(cfg, teacher, shards)
    if removed := remove_temporaries(stage):  # this run holds the run directory (engine/runlock.py)
        logger.info("removed %d temporary file(s) an interrupted run left in %s", len(removed), stage)
    work = lambda: label_pool(cfg, round_index, stage, inputs, shards, teacher["checkpoint"])  # noqa: E731
    return run_stage(f"pseudo-labels of round {round_index}", stage, inputs, work)


def label_pool(cfg: RunConfig, round_index: int, stage: Path, inputs: dict, shards: list[str], teacher: str) -> dict:
    """The pseudo-label stage's work: the shards not labeled by an earlier, interrupted
    run, in `label_shards` tasks on the configured runner; progress and stats shown."""
    logger = get_run_logger()
    family = get_family(cfg.family)
    storage.makedirs(stage)
    num_classes = family.num_classes(cfg.data)
    common = {k: v for k, v in inputs.items() if k != "shards"}
    keys = [json_digest({**common, "shard": ident}) for ident in inputs["shards"]]
    done, todo = finished_shards(stage, list(range(len(keys))), keys)
    per_shard = list(done.values())
    if per_shard:
        logger.info(
            "%d of %d shards were labeled by an earlier run; labeling the other %d", len(done), len(keys), len(todo)
        )
    progress = artifacts.LabelingProgress(round_index, len(shards), finished=per_shard)
    if todo:
        with runners.labeling_runner(cfg.pseudo, cfg.device, logger) as runner:
            size = cfg.pseudo.chunk_size(len(todo))
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            logger.info("labeling %d shards in %d tasks of up to %d shards", len(todo), len(chunks), size)
            task = dict(cfg=cfg, teacher_checkpoint=teacher, out_dir=str(stage), num_classes=num_classes)
            futures = [
                runner.submit(
                    units.label_shards,
                    parameters=dict(task, shards=[shards[i] for i in c], indices=c, keys=[keys[i] for i in c]),
                )
                for c in chunks
            ]
            for fut in as_completed(futures):
                for stats in fut.result():
                    per_shard.append(stats)
                    progress.advance(stats)
    outputs = pool_outputs(in_run(stage, ""), per_shard, keys, num_classes)
    total = outputs["stats"]
    for b in outputs["broken"]:
        logger.warning("broken shard %s, its readable records labeled: %s", b["shard"], b["error"])
    for shard in outputs["empty"]:
        logger.warning("shard %s holds no records", shard)
    names = family.class_names(cfg.data)
    artifacts.pseudo_stats(round_index, total, family.label_unit, names, family.stats_rows(total, family.label_unit))
    logger.info(
        "round %d: %d images labeled, %d kept, %d labels, %d corrupt, %d above the pixel limit, "
        "%d broken shard(s) (%d records cut off)",
        round_index,
        total["images"],
        total["kept"],
        total["labels"],
        total["corrupt"],
        total.get("too_large", 0),
        total["broken_shards"],
        total["lost_records"],
    )
    return {**outputs, "threshold": cfg.pseudo.score_threshold}


@flow(name="student", flow_run_name="student-round-{round_index}{variant}")
@holds_run_dir
def student_flow(cfg: RunConfig, round_index: int = 0, variant: str = "") -> dict:
    """Train the noised student on human + pseudo labels, evaluate it.

    `variant` ("-1", "-2", ...): a soup ingredient's student, in its own stage folder
    `student<variant>`; the round's student has none."""
    stage = RunDir(cfg.out_dir).stage(round_index, f"student{variant}")
    teacher = teacher_outputs(cfg, round_index)
    pseudo = pseudo_outputs(cfg, round_index)
    inputs = student_inputs(cfg, teacher, pseudo)

    def refuse() -> None:
        if pseudo["stats"]["kept"] == 0:
            raise NoPseudoLabels(
                f"round {round_index}: the teacher kept no unlabeled image at pseudo.score_threshold="
                f"{pseudo.get('threshold', cfg.pseudo.score_threshold)} "
                f"({pseudo['stats']['images']} images labeled), so the student has no "
                "pseudo batch to draw; lower the threshold or train the teacher longer"
            )

    def train() -> None:
        pairs = [tuple(p) for p in pseudo["pairs"]]
        units.train_student(cfg, str(stage), json_digest(inputs), pairs, teacher["checkpoint"], resume_key(inputs))

    what = f"student{variant} of round {round_index}"
    return run_stage(what, stage, inputs, trained_model(cfg, stage, train), refuse)


@flow(name="control", flow_run_name="control-round-{round_index}")
@holds_run_dir
def control_flow(cfg: RunConfig, round_index: int = 0) -> dict:
    """Train the round's same-budget control: the student's recipe (model, init, steps,
    schedule, augmentation, noise, human batch) on human labels only, evaluated on the
    same split. Student minus control is what the pseudo-labels add; student minus
    teacher also counts the extra training steps."""
    stage = RunDir(cfg.out_dir).stage(round_index, "control")
    teacher = teacher_outputs(cfg, round_index)
    inputs = control_inputs(cfg, teacher)
    train = lambda: units.train_control(  # noqa: E731
        cfg, str(stage), json_digest(inputs), teacher["checkpoint"], resume_key(inputs)
    )
    return run_stage(f"control of round {round_index}", stage, inputs, trained_model(cfg, stage, train))


def soup_ingredients(cfg: RunConfig) -> list[tuple[str, tuple[str, ...], RunConfig]]:
    """(name, overrides, config) of each soup ingredient: the round's student, then one per
    `soup.ingredients` entry; ConfigError when one would not share the students' init."""
    raw = cfg.model_dump(mode="json")
    out = [("student", (), cfg)]
    for i, overrides in enumerate(cfg.soup.ingredients, 1):
        variant = build_config(raw, list(overrides))
        if variant.student.init == "scratch" and variant.student.train.seed != cfg.student.train.seed:
            raise ConfigError(
                f"soup ingredient {i} ({', '.join(overrides)}): students from scratch with another seed start from "
                "another initialization, and a soup averages models of one; use student.init=teacher"
            )
        out.append((f"student-{i}", tuple(overrides), variant))
    return out


@flow(name="soup", flow_run_name="soup-round-{round_index}")
@holds_run_dir
def soup_flow(cfg: RunConfig, round_index: int = 0) -> dict:
    """Train the round's soup ingredients (student flows, each skipped when up to date),
    then average them into a uniform and a greedy soup (engine/soups.py), chosen on the
    held-out split, reported on val, in `<round>/soup` and the `soup-round-N` table."""
    if not cfg.soup.ingredients:
        raise ValueError("soup.ingredients is empty: name at least one more student, e.g. ['student.train.seed=1']")
    stage = RunDir(cfg.out_dir).stage(round_index, "soup")
    ingredients = []
    for name, overrides, variant_cfg in soup_ingredients(cfg):
        out = student_flow(variant_cfg, round_index, name.removeprefix("student"))
        ingredients.append(
            {"name": name, "overrides": list(overrides), "checkpoint": out["checkpoint"], "val": out["metrics"]}
        )
    inputs = {
        "stage": "soup",
        "ingredients": [(i["name"], i["overrides"], file_digest(i["checkpoint"])) for i in ingredients],
        "split": cfg.soup.split,
        "data": split_digest(cfg, cfg.soup.split),
    }

    def work() -> dict:
        report = units.make_soups(cfg, ingredients, str(stage))
        control = read_manifest(RunDir(cfg.out_dir).stage(round_index, "control")) if cfg.control else None
        artifacts.soup_table(round_index, report, control["outputs"]["metrics"][report["metric"]] if control else None)
        return {
            "files": [soups.REPORT, f"{soups.UNIFORM}/{MODEL_FILE}", f"{soups.GREEDY}/{MODEL_FILE}"],
            "metric": report["metric"],
            "ingredients": report["ingredients"],
            "soups": {k: {kk: vv for kk, vv in v.items() if kk != "val_metrics"} for k, v in report["soups"].items()},
        }

    return run_stage(f"soups of round {round_index}", stage, inputs, work)


class NoPseudoLabels(RuntimeError):
    """The pseudo-label stage kept nothing: a student cannot be trained on it."""


@flow(name="evaluate", flow_run_name="evaluate")
def evaluate_flow(cfg: RunConfig, checkpoint: str) -> dict:
    """Evaluate any saved model on the config's val split; shows a metrics table. Its
    predictions go to `evaluation/` beside the checkpoint (replaced at each evaluation)."""
    where = storage.join(storage.parent(checkpoint), EVALUATION_DIR)
    metrics = units.evaluate(cfg, checkpoint, "val", storage.text(where))
    artifacts.metrics_table_single(checkpoint, metrics)
    return metrics


# ----------------------------------------------------------------------------- rounds


@flow(name="noisy-student", flow_run_name="noisy-student")
@holds_run_dir
def noisy_student_flow(cfg: RunConfig) -> dict:
    """Teacher -> (pseudo-label -> student [-> control]) x rounds; the student teaches the next round.

    With `control: true` each round also trains its same-budget control (`control_flow`).
    `rounds: auto` runs rounds until one's student gains less than `min_gain` over its
    teacher on the held-out split (at most `max_rounds`): val, where results are
    reported, never decides. With a held-out split each round's summary also holds the
    teacher's, control's and student's held-out metric, for choosing settings. Writes
    <run>/config.yaml first and <run>/summary.json and report.md last; with several
    rounds also rounds.png, the metric per round, shown in the UI as the `rounds`
    artifact. Fails before any stage runs when inputs are missing, naming all of them
    (engine/inputs.py).
    """
    check_inputs(cfg)
    t0 = time.perf_counter()
    run = RunDir(cfg.out_dir)
    storage.makedirs(run.root)
    # Its own folder as `out_dir: .`, so the run directory works wherever it is (configs.load_config).
    atomic_write_bytes(run.config, dump_config(cfg.model_copy(update={"out_dir": "."})).encode())
    family = get_family(cfg.family)
    metric = family.metric
    teacher = teacher_flow(cfg)
    rounds = []
    auto = cfg.rounds == "auto"
    held_out_scores: dict[str, float] = {}  # checkpoint digest -> held-out metric

    def held_out(model: dict) -> float:
        if model["digest"] not in held_out_scores:
            held_out_scores[model["digest"]] = units.evaluate(cfg, model["checkpoint"], split="holdout")[metric]
        return held_out_scores[model["digest"]]

    stopped = None
    for r in range(cfg.max_rounds if auto else cfg.rounds):
        audited = audit_flow(cfg, r) if cfg.audit.split is not None else None
        pseudo = pseudo_label_flow(cfg, r)
        student = student_flow(cfg, r)
        control = control_flow(cfg, r) if cfg.control else None
        souped = soup_flow(cfg, r) if cfg.soup.ingredients else None
        stats = pseudo["stats"]
        rounds.append(
            {
                "round": r,
                "teacher_metrics": teacher["metrics"],
                "student_metrics": student["metrics"],
                **({"control_metrics": control["metrics"]} if control is not None else {}),
                "pseudo": {
                    "images": stats["images"],
                    "kept": stats["kept"],
                    "labels": stats["labels"],
                    "corrupt": stats["corrupt"],
                    "threshold": pseudo.get("threshold"),
                },
                **({"audit": audited} if audited is not None else {}),
                **({"soup": souped} if souped is not None else {}),
            }
        )
        if has_holdout(cfg):  # the figures settings are chosen on (val is where results are reported)
            rounds[-1]["held_out"] = {
                "split": "holdout",
                "teacher": held_out(teacher),
                **({"control": held_out(control)} if control is not None else {}),
                "student": held_out(student),
            }
        artifacts.metrics_table(rounds, metric)
        teacher = student
        if auto:
            gain = rounds[-1]["held_out"]["student"] - rounds[-1]["held_out"]["teacher"]
            if gain < cfg.min_gain:
                stopped = f"round {r} gained {gain:+.2f} {metric} on holdout, less than min_gain={cfg.min_gain:g}"
                get_run_logger().info("rounds: auto stops: %s", stopped)
                break
    if auto and stopped is None:
        stopped = f"max_rounds={cfg.max_rounds} reached"
    summary = {
        "family": family.name,
        "metric": metric,
        "rounds": rounds,
        "stopped": stopped,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    if len(rounds) > 1 or auto:
        artifacts.rounds_plot(summary, run.root / ROUNDS_PLOT)
    atomic_write_json(run.summary, summary)
    atomic_write_bytes(run.report, artifacts.report_markdown(summary).encode())
    return {**summary, "run_dir": str(run.root)}  # where it is now; the files inside name no path
