"""The backbones beyond EfficientNet in both families, and a student of another model.

A BiT ResNet-v2 (GroupNorm + Weight Standardization) under an FPN and a plain ViT under
the simple pyramid each train a teacher for a few steps through the engine and label
images with it; a student may be another, larger model than its teacher, from scratch
or a checkpoint, never from the teacher's weights.
"""

import math

import pytest
import torch
import yaml

from configs import ConfigError, PseudoLabelConfig, RunConfig, StudentConfig, TrainConfig, build_config, dump_config
from engine import training
from engine.families import FAMILIES
from tests.conftest import tiny_model_config, world_data
from tests.test_contract import data_config
from tests.test_distributed import sidecars

ARCHITECTURES = {"bit": dict(backbone="test_resnetv2_bit", neck="fpn"), "vit": dict(backbone="test_vit", neck="simple")}
TRAIN = TrainConfig(steps=3, batch_size=2, augment_level="none", warmup_steps=0, lr=1e-3, checkpoint_every=3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_teacher_trains_and_labels(family_name, arch, small_world, tmp_path):
    family = FAMILIES[family_name]
    data = data_config(small_world, family)
    model = tiny_model_config(**ARCHITECTURES[arch], num_classes=family.num_classes(data))
    cfg = RunConfig(family=family_name, data=data, model=model, teacher=TRAIN)
    losses = []

    def on_step(step, logs):
        losses.append(float(logs["loss"]))

    result = training.train_teacher(cfg, tmp_path / "teacher", "k", log=lambda m: None, on_step=on_step)
    assert result["step"] == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)

    loaded_family, teacher = training.load_model(tmp_path / "teacher" / training.MODEL_FILE)
    assert loaded_family is family and type(teacher.backbone.body).__name__ in ("FeatureListNet", "FeatureGetterNet")
    images = [family.labeled_dataset(data, "val", None)[i][0] for i in range(2)]
    labels = family.label_images(teacher, images, 128, PseudoLabelConfig(score_threshold=0.0))
    assert len(labels) == 2 and all(label is not None for label in labels)


def student_config(world, init: str, **student) -> RunConfig:
    return RunConfig(
        data=world_data(world),
        model=tiny_model_config(),
        teacher=TRAIN,
        student=StudentConfig(train=TRAIN, init=init, **student),
    )


def test_a_larger_student_trains_from_scratch_or_a_checkpoint(small_world, tmp_path):
    larger = tiny_model_config(**ARCHITECTURES["bit"], neck_channels=48, drop_path_rate=0.1)
    teacher_cfg = student_config(small_world, "scratch")
    torch.manual_seed(0)
    teacher = training.save_model(
        tmp_path / "teacher.pt", "detection", teacher_cfg.model, FAMILIES["detection"].build_model(teacher_cfg.model)
    )
    pairs = sidecars(small_world, tmp_path)

    cfg = student_config(small_world, "scratch", model=larger)
    training.train_student(cfg, tmp_path / "scratch", "k", pairs, teacher, log=lambda m: None)
    _, student = training.load_model(tmp_path / "scratch" / training.MODEL_FILE)
    assert student.backbone.timm_name == "test_resnetv2_bit" and student.neck.out_channels == 48

    start = training.save_model(tmp_path / "start.pt", "detection", larger, FAMILIES["detection"].build_model(larger))
    cfg = student_config(small_world, "checkpoint", model=larger, init_checkpoint=str(start))
    logs = []
    training.train_student(cfg, tmp_path / "from-checkpoint", "k", pairs, teacher, log=logs.append)
    assert any(line.startswith(f"student initialized from {start}") for line in logs)


def test_a_student_of_another_architecture_cannot_start_from_the_teacher():
    data = {"train_images": "a", "train_annotations": "b", "val_images": "c", "val_annotations": "d"}
    larger = {"backbone": "tf_efficientnet_b1", "drop_path_rate": 0.2}
    with pytest.raises(ConfigError) as err:
        build_config({"data": data, "student": {"init": "teacher", "model": larger}})
    assert "backbone: teacher 'tf_efficientnet_b0', student 'tf_efficientnet_b1'" in str(err.value)
    assert "drop_path_rate" not in str(err.value)  # noise may differ: it is not the architecture
    # the same architecture with more noise starts from the teacher
    noised = build_config({"data": data, "student": {"init": "teacher", "model": {"drop_path_rate": 0.2}}})
    assert noised.student_model.drop_path_rate == 0.2
    assert build_config({"data": data, "student": {"init": "scratch", "model": larger}}).student_model == (
        noised.student_model.model_copy(update={"backbone": "tf_efficientnet_b1"})
    )


def test_a_student_model_takes_the_teachers_keys_it_does_not_name(tmp_path):
    data = {"train_images": "a", "train_annotations": "b", "val_images": "c", "val_annotations": "d"}
    weights = tmp_path / "b0.pt"
    teacher = {"num_classes": 3, "neck_channels": 64, "anchor_scale": 3, "backbone_checkpoint": str(weights)}
    cfg = build_config(
        {"data": data, "model": teacher, "student": {"init": "scratch", "model": {"backbone": "tf_efficientnet_b1"}}}
    )
    s = cfg.student_model
    assert (s.backbone, s.num_classes, s.neck_channels, s.anchor_scale) == ("tf_efficientnet_b1", 3, 64, 3)
    assert s.backbone_checkpoint is None  # the B0 file does not fit B1
    same = build_config({"data": data, "model": teacher, "student": {"model": {"drop_path_rate": 0.1}}})
    assert same.student_model.backbone_checkpoint == str(weights)
    assert same.student_model.num_classes == 3
    # a run directory's config.yaml (the full student model written out) reads back the same
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again.student_model == s
