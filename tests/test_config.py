from pathlib import Path

import pytest
from pydantic import ValidationError

from configs import PRESET_DIR, ConfigError, build_config, load_config, parse_overrides

DATA = {
    "train_images": "i",
    "train_annotations": "a.json",
    "val_images": "i",
    "val_annotations": "b.json",
}


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_shipped_preset_builds(preset):
    cfg = load_config(preset)
    assert cfg.data.image_size % 128 == 0
    # Every preset says how to run it and what it costs.
    head = (PRESET_DIR / f"{preset}.yaml").read_text().split("\n\n")[0]
    assert "Run:" in head and "Cost:" in head


def test_unknown_key_names_its_path_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"data": DATA, "teacher": {"stepz": 3}})
    msg = str(err.value)
    assert "teacher.stepz" in msg and "did you mean 'steps'" in msg and "batch_size" in msg


def test_bad_value_names_the_value():
    with pytest.raises(ConfigError, match="data.image_size=200"):
        build_config({"data": {**DATA, "image_size": 200}})
    with pytest.raises(ConfigError, match="student.train.augment_level"):
        build_config({"data": DATA, "student": {"train": {"augment_level": "S9"}}})


def test_overrides_are_typed_and_nested():
    cfg = build_config({"data": DATA}, ["student.alpha=2", "teacher.steps=7", "pseudo.per_class_cap=3"])
    assert cfg.student.alpha == 2.0 and cfg.teacher.steps == 7 and cfg.pseudo.per_class_cap == 3
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["student.alpha"])


def test_configs_are_frozen():
    cfg = build_config({"data": DATA})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.teacher.steps = 3  # type: ignore[misc]


def test_missing_preset_lists_presets(tmp_path: Path):
    with pytest.raises(ConfigError, match="demo"):
        load_config(tmp_path / "nope.yaml")


def test_student_pseudo_per_batch_follows_ratio():
    cfg = build_config({"data": DATA, "student": {"pseudo_ratio": 0.5, "train": {"batch_size": 16}}})
    assert cfg.student.pseudo_per_batch == 8


PRODUCTION_PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("demo"))


@pytest.mark.parametrize("preset", PRODUCTION_PRESETS)
def test_production_student_is_noised_more_than_its_teacher(preset):
    """The paper's student: a stronger augmentation level than the teacher's (S3 or S4)
    plus stochastic depth; the preset's header says which."""
    from data.augment import LEVELS

    cfg = load_config(preset)
    teacher, student = cfg.teacher.augment_level, cfg.student.train.augment_level
    assert student in ("S3", "S4") and LEVELS.index(student) > LEVELS.index(teacher), (teacher, student)
    assert cfg.student_model.drop_path_rate > cfg.model.drop_path_rate
    head = (PRESET_DIR / f"{preset}.yaml").read_text().split("\n\n")[0]
    assert f"Student, noised as in the paper: {student}" in head
    assert f"drop_path_rate {cfg.student_model.drop_path_rate}" in head


def test_production_presets_are_found():
    assert {"coco-retinanet-b7", "voc-nasfpn-b7"} <= set(PRODUCTION_PRESETS)


VOC = {"format": "voc", "voc_root": "/data/VOC2012"}


@pytest.mark.parametrize(
    "family, data, want",
    [
        ("detection", {**VOC, "format": "cityscapes"}, "'coco' or 'voc'"),
        ("segmentation", {"format": "coco", **DATA}, "'voc'"),
    ],
)
def test_family_and_data_format_must_match(family, data, want):
    """configs/ names no family: the family says which layouts it reads (engine/families.py)."""
    from engine.families import check_config

    cfg = build_config({"family": family, "data": data})
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert f"family={family!r} reads data.format={want}, but data.format={data['format']!r}" in msg


@pytest.mark.parametrize(
    "data, missing",
    [
        ({"format": "voc"}, "data.voc_root"),
        ({"format": "coco", "train_images": "i", "val_images": "v"}, "data.train_annotations, data.val_annotations"),
    ],
)
def test_the_layout_names_the_keys_it_needs(data, missing):
    from engine.families import check_config

    family = "segmentation" if data["format"] == "voc" else "detection"
    with pytest.raises(ConfigError, match=f"data.format={data['format']!r} needs {missing}$"):
        check_config(build_config({"family": family, "data": data}))


def test_configs_name_no_family():
    """The schema knows formats by name only; which family reads which is the family's."""
    import configs
    from engine.families import FAMILIES

    text = Path(configs.__file__).read_text()
    assert all(f'"{name}": ' not in text for name in FAMILIES)
    assert not hasattr(configs, "FAMILY_DATA_FORMATS")


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["teacher.lr=-1"], ["teacher.lr", "-1"]),
        (["student.train.optimizer=sgdx"], ["student.train.optimizer", "'sgdx'"]),
        (["data.num_workers=abc"], ["data.num_workers", "'abc'"]),
        (["pseudo.scales=[5]"], ["pseudo.scales", "5"]),
        (["teacher.scale_jitter=[1, 2, 3]"], ["teacher.scale_jitter", "[1, 2, 3]"]),
        (["data.image_size=200"], ["data.image_size=200"]),
        (["teacher.batch_size=6", "teacher.processes=4"], ["teacher:", "batch_size=6", "processes=4"]),
        (["student.init=checkpoint"], ["student.init='checkpoint'", "student.init_checkpoint"]),
    ],
)
def test_every_validation_error_names_its_key_and_value(overrides, names):
    with pytest.raises(ConfigError) as err:
        build_config({"data": DATA}, overrides)
    msg = str(err.value)
    assert all(n in msg for n in names), msg
    # a check across keys names them; the whole section is not dumped after it
    assert "train_annotations" not in msg and len(msg.splitlines()) == 2, msg
