"""The scale jitter and RandAugment's N and M are config values that reach the augmentation."""

import pytest
import torch

from configs import ConfigError, RunConfig, TrainConfig, build_config, load_config
from data import augment
from data.augment import IGNORE, Augment
from data.mixing import PseudoLabeledShards
from detection import pseudo
from engine import training
from engine.families import FAMILIES
from tests.conftest import tiny_model_config
from tests.test_contract import data_config

SIZE = 128


def square_sample():
    """A 128 x 128 image fully covered by one box and a mask of class 1."""
    image = torch.full((3, SIZE, SIZE), 200, dtype=torch.uint8)
    target = {
        "boxes_xyxy": torch.tensor([[0.0, 0.0, SIZE, SIZE]]),
        "labels": torch.tensor([0]),
        "mask": torch.ones(SIZE, SIZE, dtype=torch.uint8),
    }
    return image, target


def test_defaults_are_the_recipe_values():
    cfg = TrainConfig()
    assert cfg.scale_jitter is None  # the level's range: S1/S2 (0.8, 1.2), S3/S4 (0.5, 2.0)
    assert (cfg.randaugment_n, cfg.randaugment_m) == (augment.RANDAUGMENT_N, augment.RANDAUGMENT_M) == (2, 10)
    assert training.augmentation(cfg) == Augment("S1")


@pytest.mark.parametrize("level", ["S1", "S4"])  # S2/S3 policies may move or cut the square
def test_scale_jitter_sets_the_scale(level):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        _, t = Augment(level, scale_range=(0.25, 0.25), randaugment_n=0)(*square_sample(), SIZE, g)
        side = (t["mask"] != IGNORE).sum(0).max().item()
        assert side == SIZE // 4, side
        box = t["boxes_xyxy"][0]
        assert (box[2] - box[0]).item() == pytest.approx(SIZE / 4)


def test_randaugment_n_and_m_reach_s4(monkeypatch):
    seen = []
    real = augment.randaugment

    def spy(image, target, n, m, generator=None):
        seen.append((n, m))
        return real(image, target, n, m, generator)

    monkeypatch.setattr(augment, "randaugment", spy)
    Augment("S4", randaugment_n=3, randaugment_m=4.0)(*square_sample(), SIZE)
    Augment("S4")(*square_sample(), SIZE)
    assert seen == [(3, 4.0), (2, 10)]


def test_train_config_values_reach_every_dataset(small_world):
    tcfg = TrainConfig(augment_level="S4", scale_jitter=(0.2, 1.5), randaugment_n=3, randaugment_m=7)
    aug = training.augmentation(tcfg)
    assert aug == Augment("S4", (0.2, 1.5), 3, 7.0)
    for family in FAMILIES.values():
        assert family.labeled_dataset(data_config(small_world, family), "train", aug).augment == aug
    shards = PseudoLabeledShards([("a.tar", "b.tar")], pseudo.decode, "json", aug, SIZE)
    assert shards.augment == aug


def test_teacher_stage_augments_with_its_config(small_world, tmp_path, monkeypatch):
    used = []
    real = Augment.__call__

    def spy(self, image, target, size, generator=None):
        used.append(self)
        return real(self, image, target, size, generator)

    monkeypatch.setattr(Augment, "__call__", spy)
    teacher = TrainConfig(
        steps=1,
        batch_size=2,
        warmup_steps=0,
        augment_level="S4",
        scale_jitter=(0.3, 0.6),
        randaugment_n=1,
        randaugment_m=3,
    )
    data = data_config(small_world, FAMILIES["detection"])
    cfg = RunConfig(data=data, model=tiny_model_config(), teacher=teacher)
    training.train_teacher(cfg, tmp_path, "k", log=lambda m: None)
    assert used and set(used) == {Augment("S4", (0.3, 0.6), 1, 3.0)}


def test_bad_jitter_names_its_path_and_value():
    data = {"train_images": "i", "train_annotations": "a", "val_images": "i", "val_annotations": "b"}
    with pytest.raises(ConfigError, match=r"teacher\.scale_jitter.*\[1\.5, 0\.2\]"):
        build_config({"data": data}, ["teacher.scale_jitter=[1.5, 0.2]"])
    with pytest.raises(ConfigError, match=r"student\.train\.randaugment_m.*11"):
        build_config({"data": data}, ["student.train.randaugment_m=11"])


def test_voc_preset_uses_the_pascal_jitter():
    cfg = load_config("voc-nasfpn-b7")
    assert cfg.teacher.scale_jitter == cfg.student.train.scale_jitter == (0.2, 1.5)
