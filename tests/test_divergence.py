"""NaN or inf loss: the stage stops with one error naming the step and the loss parts, the
last good checkpoint stays intact, and a rerun with a lower lr resumes from it."""

import json
import os

import pytest
import torch
from torch import nn

from configs import RunConfig, TrainConfig, dump_config
from engine import launcher
from engine.loop import CHECKPOINT, DIVERGED, DIVERGED_CHECKPOINT, TrainingDiverged, fit
from tests.conftest import tiny_model_config, world_data

NAN = float("nan")


def batches(start):
    g = torch.Generator().manual_seed(start)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield {"images": x, "y": x.sum(1, keepdim=True)}


def loss_nan_at(bad_step: int | None):
    """A step_loss with human and pseudo parts whose pseudo part is NaN at 0-based `bad_step`."""
    calls = []

    def step_loss(model, batch):
        loss_h = ((model(batch["images"]) - batch["y"]) ** 2).mean()
        loss_p = loss_h * (NAN if len(calls) == bad_step else 0.5)
        calls.append(1)
        loss = loss_h + loss_p
        return loss, {"loss": loss.item(), "loss_h": loss_h.item(), "loss_p": loss_p.item()}

    return step_loss


def train(stage, cfg, step_loss, key, resume_key="r", on_step=None, log=None):
    torch.manual_seed(0)
    return fit(
        stage,
        nn.Linear(4, 1),
        batches,
        step_loss,
        cfg,
        "cpu",
        key=key,
        resume_key=resume_key,
        log=log or (lambda m: None),
        on_step=on_step,
    )


CFG = TrainConfig(steps=10, batch_size=8, checkpoint_every=4, log_every=100, warmup_steps=0, lr=0.05)


@pytest.fixture
def diverged(tmp_path):
    """A run whose loss is NaN at its 6th step (checkpoint of step 4 written before)."""
    stamps = {}

    def keep_step_4(step, logs):
        if step == 4:
            stamps["bytes"] = (tmp_path / CHECKPOINT).read_bytes()

    with pytest.raises(TrainingDiverged) as err:
        train(tmp_path, CFG, loss_nan_at(5), key="k-lr0.05", on_step=keep_step_4)
    return tmp_path, err.value, stamps["bytes"]


def test_nan_loss_names_the_step_and_the_loss_parts(diverged):
    stage, err, _ = diverged
    text = str(err)
    assert "the loss is not finite at step 6/10" in text
    assert "loss_p=nan" in text and "loss_h=" in text and "lr=0.05" in text
    assert f"the last good checkpoint (step 4) is kept in {stage / CHECKPOINT}" in text
    assert "rerun with a lower learning rate (e.g. --set lr=0.025)" in text
    assert isinstance(err, FloatingPointError)
    record = json.loads((stage / DIVERGED).read_text())
    assert record["step"] == 6 and record["checkpoint_step"] == 4 and record["key"] == "k-lr0.05"


def test_last_good_checkpoint_stays_intact(diverged):
    stage, _, step_4 = diverged
    assert (stage / CHECKPOINT).read_bytes() == step_4
    assert (stage / DIVERGED_CHECKPOINT).read_bytes() == step_4
    assert sorted(p.name for p in stage.iterdir()) == sorted([CHECKPOINT, DIVERGED_CHECKPOINT, DIVERGED])


def test_rerun_with_a_lower_lr_resumes_from_the_last_good_checkpoint(diverged):
    stage, _, step_4 = diverged
    msgs = []
    lower = CFG.model_copy(update={"lr": 0.025})
    result = train(stage, lower, loss_nan_at(None), key="k-lr0.025", log=msgs.append)
    assert result["resumed_from"] == 4 and result["step"] == 10
    assert any("last good checkpoint of a run that diverged with lr=0.05; now lr=0.025" in m for m in msgs), msgs
    state = torch.load(stage / CHECKPOINT, weights_only=True)
    assert state["step"] == 10 and state["key"] == "k-lr0.025"
    assert (stage / DIVERGED_CHECKPOINT).read_bytes() == step_4  # the diverged run's checkpoint is kept


def test_a_diverged_checkpoint_resumes_only_under_the_same_other_inputs(diverged):
    stage, _, _ = diverged
    lower = CFG.model_copy(update={"lr": 0.025})
    assert train(stage, lower, loss_nan_at(None), key="k2", resume_key="other data")["resumed_from"] == 0


def test_a_finished_checkpoint_is_not_resumed_under_another_lr(tmp_path):
    """Without a divergence, a changed lr is another stage: it trains from step 0."""
    train(tmp_path, CFG, loss_nan_at(None), key="k-lr0.05")
    lower = CFG.model_copy(update={"lr": 0.025})
    assert train(tmp_path, lower, loss_nan_at(None), key="k-lr0.025")["resumed_from"] == 0


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """An update that leaves a weight infinite (the loss may still be finite) stops at the next
    checkpoint instead of writing it; the previous checkpoint stays."""
    model = nn.Linear(4, 1)
    model.register_parameter("scale", nn.Parameter(torch.ones(())))

    def poison_after_5(step, logs):
        if step == 5:
            with torch.no_grad():
                model.scale.fill_(float("inf"))

    step_loss = loss_nan_at(None)
    with pytest.raises(TrainingDiverged, match="a weight is not finite at step 8/10") as err:
        fit(tmp_path, model, batches, step_loss, CFG, "cpu", key="k", log=lambda m: None, on_step=poison_after_5)
    assert err.value.checkpoint_step == 4
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 4


def test_non_finite_gradient_norm_stops_before_the_update(tmp_path):
    def sqrt_at_zero(model, batch):
        loss = torch.sqrt(model(batch["images"]) * 0).sum()  # finite value, NaN gradient
        return loss, {"loss": loss.item()}

    model = nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        TrainingDiverged, match=r"the gradient norm is not finite at step 1/10 \(loss=0, grad_norm=nan\)"
    ):
        fit(tmp_path, model, batches, sqrt_at_zero, CFG, "cpu", key="k", log=lambda m: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def raise_diverged(*, device, log, on_step):
    raise TrainingDiverged("the loss", 3, 10, {"loss": NAN}, 0.1, "/tmp/stage", None, "teacher.lr")


def test_launch_raises_a_ranks_divergence_as_it_is():
    """On several processes the error is the rank's TrainingDiverged, not a WorkerError with a traceback."""
    with pytest.raises(TrainingDiverged) as err:
        launcher.launch(raise_diverged, (), 2, "cpu", log=lambda m: None)
    assert str(err.value).startswith("the loss is not finite at step 3/10 (loss=nan) with lr=0.1; no checkpoint")
    assert "Traceback" not in str(err.value)


# ----------------------------------------------------------------------------- a stage, from the CLI


def test_diverged_teacher_stage_resumes_after_a_lower_lr(prefect_harness, small_world, tmp_path, monkeypatch, capsys):
    from engine import training
    from flows.cli import main

    data = world_data(small_world)
    teacher = TrainConfig(
        steps=8, batch_size=2, augment_level="none", warmup_steps=0, lr=3e-3, checkpoint_every=3, log_every=1
    )
    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=data, model=tiny_model_config(), teacher=teacher)
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    stage = tmp_path / "run" / "round-0" / "teacher"

    real, calls = training._sum_losses, []

    def nan_at_6th_step(losses):
        calls.append(1)
        total = real(losses)
        return total * NAN if len(calls) == 6 else total

    monkeypatch.setattr(training, "_sum_losses", nan_at_6th_step)
    assert main(["stage", "teacher", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("noisy-student: the loss is not finite at step 6/8 (loss=nan"), err
    assert "the last good checkpoint (step 3)" in err and "--set teacher.lr=0.0015" in err
    kept = (stage / CHECKPOINT).read_bytes()
    assert torch.load(stage / CHECKPOINT, weights_only=True)["step"] == 3
    assert not (stage / "manifest.json").exists()

    monkeypatch.setattr(training, "_sum_losses", real)
    assert main(["stage", "teacher", str(config), "--set", "teacher.lr=0.0015"]) == 0
    log = (stage / "train.log").read_text()
    assert "at step 3/8, the last good checkpoint of a run that diverged with lr=0.003; now lr=0.0015" in log
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["lr"] == 0.0015
    assert (stage / DIVERGED_CHECKPOINT).read_bytes() == kept
    assert os.path.exists(stage / "model.pt")
