"""The same-budget control: the student's recipe on human labels only."""

import pytest
import torch

from configs import RunConfig, StudentConfig, TrainConfig
from detection.family import DetectionFamily
from engine import training
from engine.families import get_family
from flows import stages
from tests.conftest import tiny_model_config, world_data
from tests.test_distributed import sidecars

STEPS = 2


def config(world, **student) -> RunConfig:
    train = TrainConfig(
        steps=STEPS, batch_size=4, augment_level="none", warmup_steps=0, lr=1e-3, checkpoint_every=1, log_every=1
    )
    return RunConfig(
        data=world_data(world),
        model=tiny_model_config(),
        teacher=train,
        student=StudentConfig(train=train, init="teacher", **student),
    )


@pytest.fixture
def seen_batches(monkeypatch):
    """(images in the forward pass, num_human, first box of each image) of every training step."""
    seen = []
    real = DetectionFamily.losses

    def spy(self, model, batch):
        boxes = [t["boxes_xyxy"][:1].tolist() for t in batch["targets"]]
        seen.append((len(batch["images"]), batch["num_human"], boxes))
        return real(self, model, batch)

    monkeypatch.setattr(DetectionFamily, "losses", spy)
    return seen


def teacher_file(cfg: RunConfig, path) -> str:
    torch.manual_seed(0)
    model = get_family(cfg.family).build_model(cfg.model)
    return str(training.save_model(path, cfg.family, cfg.model, model))


def test_control_forwards_human_images_only(small_world, tmp_path, monkeypatch, seen_batches):
    cfg = config(small_world)
    teacher = teacher_file(cfg, tmp_path / "teacher.pt")

    def no_pseudo(*args, **kwargs):
        raise AssertionError("the control opened pseudo-labeled shards")

    logs = []
    with monkeypatch.context() as m:
        m.setattr(training, "PseudoLabeledShards", no_pseudo)
        result = training.train_control(cfg, tmp_path / "control", "k", teacher, log=logs.append)
    assert result["step"] == STEPS
    assert [(n, h) for n, h, _ in seen_batches] == [(4, 4)] * STEPS
    assert any(line.startswith("control initialized from") for line in logs)
    # The same spy sees the student's pseudo half (a pseudo-label box every sidecar shares).
    seen_batches.clear()
    pairs = sidecars(small_world, tmp_path)
    training.train_student(cfg, tmp_path / "student", "k", pairs, teacher, log=lambda m: None)
    assert [(n, h) for n, h, _ in seen_batches] == [(8, 4)] * STEPS
    assert all(boxes[4:] == [[[4.0, 4.0, 60.0, 50.0]]] * 4 for _, _, boxes in seen_batches)


def test_control_starts_from_the_teacher_as_the_student_does(small_world, tmp_path, monkeypatch):
    cfg = config(small_world)
    teacher = teacher_file(cfg, tmp_path / "teacher.pt")
    loaded = []
    real = training.storage.torch_load

    def spy(path, *args, **kwargs):
        loaded.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training.storage, "torch_load", spy)
    training.train_control(cfg, tmp_path / "control", "k", teacher, log=lambda m: None)
    assert loaded[0] == teacher


def test_control_inputs_leave_out_the_pseudo_part_only():
    """The control's digest follows the student's recipe and teacher, not the pseudo-labels."""
    from configs import DataConfig

    data = DataConfig(train_images="a", train_annotations="b", val_images="c", val_annotations="d")
    cfg = RunConfig(data=data, student=StudentConfig(init="teacher"))
    teacher = {"digest": "t0"}
    base = stages.control_inputs(cfg, teacher)

    def changed(**update) -> RunConfig:
        return cfg.model_copy(update={"student": cfg.student.model_copy(update=update)})

    assert stages.control_inputs(changed(alpha=3.0, pseudo_ratio=2.0, normalize_loss=False), teacher) == base
    lr = cfg.student.train.model_copy(update={"lr": 1e-4})
    assert stages.control_inputs(changed(train=lr), teacher) != base
    assert stages.control_inputs(cfg, {"digest": "t1"}) != base
    scratch = stages.control_inputs(changed(init="scratch"), {"digest": "t1"})
    assert scratch["teacher"] is None  # from scratch the teacher's weights do not matter
    assert "pseudo" not in base and base["stage"] == "control"


def test_rounds_auto_decides_on_held_out_figures(prefect_harness, small_world, tmp_path, monkeypatch):
    """Val says every round gains 10 AP; the held-out split says round 1 gains 0.2, so
    `rounds: auto` stops after round 1, and val is never evaluated to decide."""

    def model(name: str, val: float) -> dict:
        return {"checkpoint": f"{name}.pt", "digest": name, "metrics": {"AP": val}, "metric": "AP"}

    stats = {"images": 4, "kept": 4, "labels": 6, "corrupt": 0}
    monkeypatch.setattr(stages, "check_inputs", lambda cfg: None)
    monkeypatch.setattr(stages, "teacher_flow", lambda cfg: model("t", 10.0))
    monkeypatch.setattr(stages, "pseudo_label_flow", lambda cfg, r: {"stats": stats, "threshold": 0.5})
    monkeypatch.setattr(stages, "student_flow", lambda cfg, r: model(f"s{r}", 20.0 + 10 * r))
    monkeypatch.setattr(stages, "control_flow", lambda cfg, r: model(f"c{r}", 18.0 + 10 * r))
    held_out = {"t": 5.0, "s0": 8.0, "c0": 6.0, "s1": 8.2, "c1": 9.0, "s2": 30.0}
    splits = []

    def evaluate(cfg, checkpoint, split="val"):
        splits.append(split)
        return {"AP": held_out[checkpoint.removesuffix(".pt")]}

    monkeypatch.setattr(stages.units, "evaluate", evaluate)
    data = world_data(
        small_world,
        holdout_images=str(small_world.images_dir),
        holdout_annotations=str(small_world.holdout_annotations),
    )
    cfg = RunConfig(
        data=data,
        model=tiny_model_config(),
        rounds="auto",
        min_gain=0.5,
        max_rounds=5,
        control=True,
        out_dir=str(tmp_path / "run"),
    )
    summary = stages.noisy_student_flow(cfg)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert set(splits) == {"holdout"} and len(splits) == 5  # t, s0, c0, s1, c1: each model once
    assert summary["rounds"][1]["held_out"] == {"split": "holdout", "teacher": 8.0, "control": 9.0, "student": 8.2}
    assert summary["stopped"] == "round 1 gained +0.20 AP on holdout, less than min_gain=0.5"
    assert summary["rounds"][0]["control_metrics"]["AP"] == 18.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 0 | 10.00 | 18.00 | 20.00 | +10.00 | +2.00 |" in report
    assert "round 1: teacher 8.00, control 9.00, student 8.20 (+0.20 over the teacher) AP on holdout" in report


def test_rounds_auto_needs_a_held_out_split(small_world):
    from configs import ConfigError, build_config
    from engine.families import check_config

    raw = {"data": world_data(small_world).model_dump(mode="json"), "rounds": "auto"}
    with pytest.raises(ConfigError, match="rounds='auto'.*data.holdout_images, data.holdout_annotations"):
        check_config(build_config(raw))
