"""The training engine resumes from its checkpoint and ends at the same step count."""

import pytest
import torch
from torch import nn

from configs import TrainConfig
from engine.loop import CHECKPOINT, fit, lr_factor


def batches(start):
    g = torch.Generator().manual_seed(start)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield {"images": x, "y": x.sum(1, keepdim=True)}


def step_loss(model, batch):
    loss = ((model(batch["images"]) - batch["y"]) ** 2).mean()
    return loss, {"loss": loss.item()}


class Crash(RuntimeError):
    pass


def test_killed_stage_resumes_from_checkpoint(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, checkpoint_every=5, log_every=5, warmup_steps=2, lr=0.05)
    seen = []

    def crash_at_7(step, logs):
        seen.append(step)
        if step == 7:
            raise Crash

    torch.manual_seed(0)
    with pytest.raises(Crash):
        fit(tmp_path, nn.Linear(4, 1), batches, step_loss, cfg, "cpu", key="k", log=lambda m: None, on_step=crash_at_7)
    assert (tmp_path / CHECKPOINT).exists()

    steps_after = []
    result = fit(
        tmp_path,
        nn.Linear(4, 1),
        batches,
        step_loss,
        cfg,
        "cpu",
        key="k",
        log=lambda m: None,
        on_step=lambda s, _: steps_after.append(s),
    )
    assert result["resumed_from"] == 5 and result["step"] == 12
    assert steps_after == list(range(6, 13))
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 12


def test_checkpoint_of_other_inputs_is_ignored(tmp_path):
    cfg = TrainConfig(steps=6, checkpoint_every=3, warmup_steps=0)
    fit(tmp_path, nn.Linear(4, 1), batches, step_loss, cfg, "cpu", key="a", log=lambda m: None)
    msgs = []
    result = fit(tmp_path, nn.Linear(4, 1), batches, step_loss, cfg, "cpu", key="b", log=msgs.append)
    assert result["resumed_from"] == 0
    assert any("other inputs" in m for m in msgs)


def test_training_reduces_loss(tmp_path):
    cfg = TrainConfig(steps=150, checkpoint_every=1000, warmup_steps=5, lr=0.05, weight_decay=0.0)
    model = nn.Linear(4, 1)
    first = step_loss(model, next(batches(99)))[0].item()
    fit(tmp_path, model, batches, step_loss, cfg, "cpu", key="k", log=lambda m: None)
    assert step_loss(model, next(batches(99)))[0].item() < 0.05 * first


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = TrainConfig(steps=3, warmup_steps=0)

    def bad(model, batch):
        return model(batch["images"]).sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="step 1/3"):
        fit(tmp_path, nn.Linear(4, 1), batches, bad, cfg, "cpu", key="k", log=lambda m: None)


def test_resumed_stage_draws_fresh_noise(tmp_path):
    """The global RNG (dropout, in-process augmentation) after a resume is not step 0's again."""
    cfg = TrainConfig(steps=4, checkpoint_every=2, warmup_steps=0)
    draws = []

    def noisy_loss(model, batch):
        draws.append(torch.rand(()).item())
        return step_loss(model, batch)

    def crash_at_2(step, logs):
        if step == 2:
            raise Crash

    torch.manual_seed(0)  # as the stages seed before building the model
    with pytest.raises(Crash):
        fit(tmp_path, nn.Linear(4, 1), batches, noisy_loss, cfg, "cpu", key="k", log=lambda m: None, on_step=crash_at_2)
    first = list(draws)
    draws.clear()
    torch.manual_seed(0)
    result = fit(tmp_path, nn.Linear(4, 1), batches, noisy_loss, cfg, "cpu", key="k", log=lambda m: None)
    assert result["resumed_from"] == 2 and len(draws) == 2
    assert draws != first  # not a replay of steps 1-2's noise
