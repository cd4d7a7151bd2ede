"""`noisy-student plan`: stage times from measured throughputs, shards per labeling device, task counts."""

import json
import math
from collections import Counter

import pytest
import torch

from configs import dump_config
from detection.family import DetectionFamily
from engine import planner
from engine.planner import TASK_OVERHEAD_S
from flows.cli import main
from flows.demo import demo_config

FAMILY = DetectionFamily()

RATES = {"source": "given", "teacher_step_s": 0.5, "student_step_s": 1.0, "label_img_s": 40.0}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick demo's config and world: 16 train, 16 val, 48 unlabeled images in 3 shards."""
    cfg, _ = demo_config(tmp_path_factory.mktemp("plan"), quick=True)
    return cfg


def test_the_task_overhead_is_the_committed_measurement():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/noop-labeling-10000.json"
    runners = json.loads(path.read_text())["runners"]
    for runner in ("thread", "dask"):
        assert TASK_OVERHEAD_S[runner] == pytest.approx(runners[runner]["overhead_per_task_s"], abs=0.001), runner


def test_the_plan_adds_its_stages_from_the_rates(quick):
    cfg = quick.model_copy(update={"rounds": 2})
    p = planner.plan(cfg, gpus=2, rates=RATES)
    evaluate = 16 / 40.0  # the val split at the labeling rate
    assert p["stages_s"]["teacher"] == pytest.approx(cfg.teacher.steps * 0.5 + evaluate, abs=0.1)
    assert p["stages_s"]["student"] == pytest.approx(cfg.student.train.steps * 1.0 + evaluate, abs=0.1)
    # 48 images on the one device that labels at 40 img/s, plus one task's orchestration per shard chunk
    assert p["stages_s"]["pseudo-label"] == pytest.approx(48 / 40 + 3 * TASK_OVERHEAD_S["thread"], abs=0.06)
    assert p["stages_s"]["audit"] == pytest.approx(8 / 40.0, abs=0.1)  # the quick world's 8 held-out images
    # the control: the student's steps on its 4 human images of 4 + 4, at the student's cost per image
    assert p["stages_s"]["control"] == pytest.approx(cfg.student.train.steps * 1.0 * 4 / 8 + evaluate, abs=0.1)
    s = p["stages_s"]
    per_round = s["audit"] + s["pseudo-label"] + s["student"] + s["control"]
    assert p["total_s"] == pytest.approx(s["teacher"] + 2 * per_round, abs=0.2)
    assert p["labeling_devices"] == 1 and p["pool"] == {"shards": 3, "images": 48, "shards_per_device": 3}
    # the teacher's train and evaluate tasks, then per round: the audit, 3 labeling tasks, the
    # student's and the control's train and evaluate
    assert p["labeling_tasks_per_round"] == 3 and p["prefect_tasks"] == 2 + 2 * (1 + 3 + 2 + 2)
    without = planner.plan(cfg.model_copy(update={"control": False}), gpus=2, rates=RATES)
    assert "control" not in without["stages_s"] and without["prefect_tasks"] == 2 + 2 * (1 + 3 + 2)
    assert planner.plan(cfg, 2, images=4800, rates=RATES)["pool"]["images"] == 4800


def test_a_soup_costs_its_extra_students_and_its_evaluations(quick):
    cfg = quick.model_copy(update={"soup": type(quick.soup)(ingredients=[["student.alpha=0.5"], ["student.alpha=2"]])})
    p = planner.plan(cfg, gpus=1, rates=RATES)
    s = p["stages_s"]
    # two more students; 6 held-out passes of 8 images and 2 val passes of 16, at 40 img/s
    assert s["soup"] == pytest.approx(2 * s["student"] + (6 * 8 + 2 * 16) / 40.0, abs=0.06)
    assert p["total_s"] == pytest.approx(sum(s.values()), abs=0.2)
    assert p["prefect_tasks"] == 2 + (1 + 3 + 2 + 2 + 2 * 2 + 1)


@pytest.mark.parametrize(
    "device, pseudo, gpus, labeling",
    [
        ("cuda", {"max_workers": 4}, 4, 4),  # every GPU of the machine, one worker each
        ("cuda", {"max_workers": 2}, 4, 2),  # two workers keep two GPUs busy
        ("cuda", {"max_workers": 8}, 4, 4),  # more workers than GPUs: still four GPUs
        ("cuda", {"max_workers": 8, "devices": ("cuda:0", "cuda:1", "cuda:2")}, 4, 3),
        ("cuda", {"max_workers": 8, "devices": ("cuda:0", "cuda")}, 4, 1),  # one GPU under two names
        ("cuda", {"max_workers": 8, "devices": ("cuda:0", "cuda:1", "cuda:2")}, 2, 2),  # at most --gpus
        ("cuda:1", {"max_workers": 4}, 4, 1),  # a run on one named GPU labels there
        ("cpu", {"max_workers": 4, "devices": ("cpu", "cpu:0")}, 2, 1),  # a CPU is one device
        ("cuda", {"max_workers": 2, "runner": "dask", "dask_address": "tcp://s:8786"}, 4, 4),  # a worker per GPU
    ],
)
def test_labeling_is_divided_by_the_devices_that_label(quick, device, pseudo, gpus, labeling):
    cfg = quick.model_copy(update={"device": device, "pseudo": quick.pseudo.model_copy(update=pseudo)})
    p = planner.plan(cfg, gpus=gpus, rates=RATES)
    assert p["labeling_devices"] == labeling
    overhead = TASK_OVERHEAD_S[cfg.pseudo.runner] * 3
    assert p["stages_s"]["pseudo-label"] == pytest.approx(48 / (labeling * 40) + overhead, abs=0.06)
    assert p["pool"]["shards_per_device"] == math.ceil(3 / labeling)


@pytest.mark.parametrize("extra", [1, 3])
def test_the_plan_counts_the_soups_own_evaluations(quick, tmp_path, monkeypatch, extra):
    """make_soups on tiny ingredients, the family's evaluate counting its passes per split:
    the counts are the planner's."""
    from engine.soups import make_soups
    from engine.training import save_model
    from tests.conftest import tiny_model_config

    model_cfg = tiny_model_config()
    ingredients = []
    for i in range(extra + 1):
        torch.manual_seed(i)
        path = save_model(tmp_path / f"ing{i}" / "model.pt", "detection", model_cfg, FAMILY.build_model(model_cfg))
        ingredients.append({"name": f"ing{i}", "overrides": [], "checkpoint": str(path), "val": {"AP": 10.0}})
    passes = Counter()

    def counting(self, model, data, batch_size=32, num_workers=0, split="val"):
        passes[split] += 1
        return {"AP": float(passes[split] % 3)}  # kept and rejected greedy candidates alike

    monkeypatch.setattr(DetectionFamily, "evaluate", counting)
    make_soups(quick, ingredients, tmp_path / "soup", log=lambda msg: None)
    held, val = planner.soup_passes(extra)
    assert dict(passes) == {quick.soup.split: held, "val": val}


def test_the_plan_refuses_a_batch_that_does_not_split_over_the_devices(quick):
    with pytest.raises(ValueError, match="teacher.batch_size=4 is not divisible by --gpus 3"):
        planner.plan(quick, gpus=3, rates=RATES)


def test_the_probe_measures_the_configs_own_model(quick):
    rates = planner.probe(quick, gpus=1)
    assert rates["source"].startswith("probe on cpu")
    assert 0 < rates["teacher_step_s"] < 30 and 0 < rates["student_step_s"] < 30 and rates["label_img_s"] > 0


def test_figures_are_used_only_at_the_configs_sizes(quick, tmp_path):
    fig = {
        "family": "detection",
        "device": "cpu",
        "sizes": {"image_size": 128, "teacher_batch": 4, "student_batch": [4, 4], "label_batch": 16},
        "teacher": {"img_s": 8.0},
        "student": {"img_s": 16.0},
        "labeling": {"pipeline_img_s": 50.0},
    }
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps(fig))
    rates = planner.from_figures(quick, path, gpus=2)
    assert rates["teacher_step_s"] == pytest.approx(4 / 8.0 / 2) and rates["label_img_s"] == 50.0
    fig["sizes"]["image_size"] = 640
    path.write_text(json.dumps(fig))
    assert planner.from_figures(quick, path, gpus=2) is None


def test_plan_command_prints_every_stage_and_the_whole_run(quick, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(quick))
    assert main(["plan", str(config), "--gpus", "2", "--images", "1000"]) == 0
    out = capsys.readouterr().out
    expected = ("teacher", "pseudo-label", "student", "whole run", "1000 images in 3 shards, labeled on 1 device(s), 3")
    for line in expected:
        assert line in out, out


def test_plan_names_a_figures_file_that_does_not_exist(quick, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(quick))
    missing = tmp_path / "ratios-cuda.json"
    with pytest.raises(SystemExit, match=f"--figures {missing}: no such file"):
        main(["plan", str(config), "--gpus", "2", "--figures", str(missing)])
