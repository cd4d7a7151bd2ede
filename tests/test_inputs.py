"""Missing inputs are all named in one error, with their config keys, before any stage runs."""

import shutil

import pytest

from configs import DataConfig, RunConfig, dump_config
from engine.inputs import MissingInputsError, check_inputs, missing_inputs
from flows import stages
from flows.cli import main
from tests.conftest import tiny_model_config, world_data


def coco_config(world, out, **data) -> RunConfig:
    return RunConfig(out_dir=str(out), data=world_data(world, **data), model=tiny_model_config())


def test_complete_inputs_pass(small_world, tmp_path):
    check_inputs(coco_config(small_world, tmp_path))
    voc = RunConfig(
        family="segmentation",
        data=DataConfig(
            format="voc", voc_root=str(small_world.voc_root), unlabeled_shards=small_world.unlabeled_pattern
        ),
    )
    check_inputs(voc)


def test_every_missing_input_is_named_in_one_error(small_world, tmp_path):
    cfg = coco_config(
        small_world,
        tmp_path / "run",
        train_images=str(tmp_path / "no-images"),
        val_annotations=str(tmp_path / "val.json"),
        unlabeled_shards=str(tmp_path / "pool-{000000..000001}.tar"),
    )
    cfg = cfg.model_copy(update={"model": tiny_model_config(backbone_checkpoint=str(tmp_path / "b.pt"))})
    with pytest.raises(MissingInputsError) as err:
        check_inputs(cfg)
    keys = [key for key, _, _ in err.value.missing]
    assert keys == [
        "data.train_images",
        "data.val_annotations",
        "model.backbone_checkpoint",
        "data.unlabeled_shards",
        "data.unlabeled_shards",
    ]
    msg = str(err.value)
    assert "5 missing input(s)" in msg and str(tmp_path / "no-images") + " (no such folder)" in msg
    assert str(tmp_path / "pool-000001.tar") + " (no such shard)" in msg
    # a stage is checked for what it reads
    assert [k for k, _, _ in missing_inputs(cfg, ["pseudo-label"])] == ["data.unlabeled_shards"] * 2
    assert [k for k, _, _ in missing_inputs(cfg, ["evaluate"])] == ["data.val_annotations"]


def test_a_file_where_a_folder_belongs_is_named(small_world, tmp_path):
    cfg = coco_config(small_world, tmp_path, val_images=str(small_world.val_annotations))
    assert missing_inputs(cfg) == [("data.val_images", str(small_world.val_annotations), "not a folder")]


def test_voc_lists_and_mask_folders_are_checked(small_world, tmp_path):
    root = tmp_path / "VOC"
    shutil.copytree(small_world.voc_root, root)
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    data = DataConfig(
        format="voc",
        voc_root=str(root),
        voc_train_split="train_aug",
        voc_train_masks="SegmentationClassAug",
        unlabeled_shards=small_world.unlabeled_pattern,
    )
    cfg = RunConfig(family="segmentation", data=data)
    with pytest.raises(MissingInputsError) as err:
        check_inputs(cfg)
    assert [(k, why) for k, _, why in err.value.missing] == [
        ("data.voc_train_split", "no such file"),
        ("data.voc_train_masks", "no such folder"),
        ("data.voc_val_split", "no such file"),
    ]
    assert str(root / "ImageSets" / "Segmentation" / "train_aug.txt") in str(err.value)


def test_many_missing_shards_are_counted(tmp_path, small_world):
    cfg = coco_config(small_world, tmp_path, unlabeled_shards=str(tmp_path / "pool-{000000..000099}.tar"))
    missing = missing_inputs(cfg, ["pseudo-label"])
    assert len(missing) == 6 and missing[-1][2] == "100 of 100 shards are missing"
    empty = coco_config(small_world, tmp_path, unlabeled_shards="")
    assert missing_inputs(empty, ["pseudo-label"]) == [("data.unlabeled_shards", "''", "matches no shard")]


def test_pipe_shards_are_left_to_their_readers(small_world, tmp_path):
    # (shards on object storage are listed: tests/test_storage.py)
    cfg = coco_config(small_world, tmp_path, unlabeled_shards="pipe:cat /data/pool-{000000..000003}.tar")
    assert missing_inputs(cfg) == []


def test_the_run_fails_before_any_stage(small_world, tmp_path):
    cfg = coco_config(small_world, tmp_path / "run", train_annotations=str(tmp_path / "train.json"))
    with pytest.raises(MissingInputsError, match="data.train_annotations"):
        stages.noisy_student_flow.fn(cfg)
    assert not (tmp_path / "run" / "round-0").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_cli_names_all_missing_inputs_and_runs_nothing(small_world, tmp_path, capsys):
    cfg = coco_config(
        small_world, tmp_path / "run", train_annotations=str(tmp_path / "train.json"), val_images=str(tmp_path / "val")
    )
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 missing input(s)" in err and "data.train_annotations" in err and "data.val_images" in err
    assert missing_inputs(cfg, ["pseudo-label"]) == []  # the labeling stage reads neither
    assert not (tmp_path / "run" / "round-0" / "teacher").exists()


def test_the_audits_and_soups_held_out_split_is_checked(small_world, tmp_path):
    from configs import AuditConfig, SoupConfig

    data = world_data(
        small_world, holdout_images=str(small_world.images_dir), holdout_annotations=str(tmp_path / "h.json")
    )
    cfg = RunConfig(out_dir=str(tmp_path), data=data, model=tiny_model_config(), audit=AuditConfig(split="holdout"))
    assert missing_inputs(cfg, ["audit"]) == [("data.holdout_annotations", str(tmp_path / "h.json"), "no such file")]
    assert missing_inputs(cfg, ["teacher"]) == []  # no training stage reads it
    souped = cfg.model_copy(update={"audit": AuditConfig(), "soup": SoupConfig(ingredients=[["student.alpha=2"]])})
    assert [k for k, _, _ in missing_inputs(souped, ["soup"])] == ["data.holdout_annotations"]
    voc = RunConfig(
        family="segmentation",
        data=DataConfig(format="voc", voc_root=str(small_world.voc_root), voc_holdout_split="nowhere"),
        audit=AuditConfig(split="holdout"),
    )
    assert [k for k, _, _ in missing_inputs(voc, ["audit"])] == ["data.voc_holdout_split"]
    ok = voc.model_copy(update={"data": voc.data.model_copy(update={"voc_holdout_split": "holdout"})})
    assert missing_inputs(ok, ["audit"]) == []
