"""Stage digests hold what decides a stage's result, never how it runs (configs: `run_setting`)."""

import pytest

from configs import DataConfig, PseudoLabelConfig, RunConfig, TrainConfig, build_config
from engine.rundir import finished, json_digest, write_manifest
from flows import stages

DATA = {"train_images": "i", "train_annotations": "a.json", "val_images": "i", "val_annotations": "b.json"}
TEACHER = {"digest": "t" * 64}
PSEUDO = {"digest": "p" * 64}

HOW_IT_RUNS = [
    "teacher.processes=2",
    "teacher.log_every=7",
    "teacher.checkpoint_every=9",
    "teacher.dist_backend=gloo",
    "teacher.channels_last=true",
    "data.num_workers=6",
    "eval_batch_size=3",
    "device=cuda:1",
    "student.train.processes=2",
    "student.train.log_every=3",
    "pseudo.max_workers=5",
    "pseudo.batch_size=4",
    "pseudo.runner=dask",
    "out_dir=elsewhere",
]


def digests(overrides: list[str]) -> dict[str, str]:
    cfg = build_config({"data": DATA}, overrides)
    return {
        "teacher": json_digest(stages.teacher_inputs(cfg)),
        "student": json_digest(stages.student_inputs(cfg, TEACHER, PSEUDO)),
        "pseudo": json_digest(stages.pseudo_inputs(cfg, TEACHER, [])),
    }


@pytest.mark.parametrize("override", HOW_IT_RUNS)
def test_how_a_stage_runs_leaves_every_digest_unchanged(override):
    assert digests([override]) == digests([])


@pytest.mark.parametrize(
    "override, changed",
    [
        ("teacher.lr=0.1", {"teacher"}),
        ("teacher.batch_size=32", {"teacher"}),
        ("student.train.lr=0.1", {"student"}),
        ("student.alpha=2", {"student"}),
        ("pseudo.score_threshold=0.3", {"pseudo"}),
        ("data.image_size=256", {"teacher", "student", "pseudo"}),
        ("model.drop_path_rate=0.1", {"teacher", "student"}),
    ],
)
def test_a_result_deciding_change_changes_its_stages_digests(override, changed):
    before, after = digests([]), digests([override])
    assert {s for s in before if before[s] != after[s]} == changed


def test_run_settings_are_declared_on_the_fields():
    assert set(TrainConfig.model_fields) - set(TrainConfig().digest_view()) == {
        "processes",
        "nodes",
        "rdzv_endpoint",
        "log_every",
        "checkpoint_every",
        "dist_backend",
        "channels_last",
        "compile",
    }
    assert "num_workers" not in DataConfig(**DATA).digest_view()
    settings = {"runner", "max_workers", "devices", "dask_address", "batch_size", "decode_threads", "shards_per_task"}
    assert settings.isdisjoint(PseudoLabelConfig().digest_view())
    # the teacher's precision and the pixel limit change its labels
    assert PseudoLabelConfig().digest_view()["amp"] == "off"
    assert PseudoLabelConfig(amp="bf16").digest_view()["amp"] == "bf16"
    assert PseudoLabelConfig(max_image_pixels=1000).digest_view() != PseudoLabelConfig().digest_view()
    view = RunConfig(data=DataConfig(**DATA)).digest_view()
    assert "eval_batch_size" not in view and "processes" not in view["student"]["train"]
    assert {"cudnn_benchmark", "host_allocator", "rounds", "min_gain", "max_rounds"}.isdisjoint(view)
    assert view["teacher"]["lr"] == TrainConfig().lr


def test_amp_digests_as_the_dtype_it_names():
    assert TrainConfig(amp="off").digest_view()["amp"] == "off"
    assert TrainConfig(amp=True).digest_view()["amp"] == "bf16"
    assert len({json_digest(TrainConfig(amp=a).digest_view()) for a in ("off", "bf16", "fp16")}) == 3


def test_a_finished_teacher_stays_finished_when_only_processes_change(tmp_path):
    cfg = build_config({"data": DATA})
    write_manifest(tmp_path, stages.teacher_inputs(cfg), {"files": [], "digest": "d"})
    assert finished(
        tmp_path, stages.teacher_inputs(build_config({"data": DATA}, ["teacher.processes=8", "teacher.batch_size=16"]))
    )
    assert finished(tmp_path, stages.teacher_inputs(build_config({"data": DATA}, ["teacher.lr=0.1"]))) is None
