"""The training engine resumes from its checkpoint and ends at the same step count."""

import pytest
import torch
from torch import nn

from configs import TrainConfig
from engine.loop import CHECKPOINT, LossNormalizer, fit, lr_factor


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


def indexed_batches(start):
    """The batch of step s depends on s alone (a human and a pseudo half), so a resumed
    run sees exactly the batches an uninterrupted one does."""
    step = start
    while True:
        g = torch.Generator().manual_seed(1000 + step)
        human, pseudo = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
        yield {"images": human, "pseudo": pseudo, "y": human.sum(1, keepdim=True), "yp": 3 * pseudo[:, :1]}
        step += 1


def train_mixed(stage_dir, on_step=None):
    """12 AdamW steps of a linear model on a normalized human + pseudo loss; returns the
    model, its loss normalizer and fit's result."""
    cfg = TrainConfig(steps=12, batch_size=8, checkpoint_every=7, log_every=100, warmup_steps=2, lr=0.05)
    assert cfg.optimizer == "adamw"  # its moments are state a resume must restore
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    normalizer = LossNormalizer(alpha=1.0, decay=0.5)

    def mixed_loss(net, batch):
        loss_h = ((net(batch["images"]) - batch["y"]) ** 2).mean()
        loss_p = ((net(batch["pseudo"]) - batch["yp"]) ** 2).mean()
        loss = normalizer(loss_h, loss_p)
        return loss, {"loss": loss.detach()}

    result = fit(
        stage_dir,
        model,
        indexed_batches,
        mixed_loss,
        cfg,
        "cpu",
        key="k",
        extra_state={"normalizer": normalizer},
        log=lambda m: None,
        on_step=on_step,
    )
    return model, normalizer, result


@pytest.mark.parametrize("lose", [None, "optimizer", "normalizer"])
def test_a_stage_stopped_at_step_7_and_resumed_matches_one_that_ran_through(tmp_path, monkeypatch, lose):
    """Bit for bit, weights and normalizer; and a resume that drops the optimizer's or the
    normalizer's state is caught (the same test, with that state's restore disabled)."""
    through, through_norm, _ = train_mixed(tmp_path / "through")

    def stop_at_7(step, logs):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train_mixed(tmp_path / "stopped", on_step=stop_at_7)
    if lose == "optimizer":
        monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, state: None)
    elif lose == "normalizer":
        monkeypatch.setattr(LossNormalizer, "load_state_dict", lambda self, state: None)
    resumed, resumed_norm, result = train_mixed(tmp_path / "stopped")
    assert result["resumed_from"] == 7 and result["step"] == 12
    same = all(torch.equal(a, b) for a, b in zip(through.state_dict().values(), resumed.state_dict().values()))
    same = same and through_norm.state_dict() == resumed_norm.state_dict()
    assert same == (lose is None), f"resume losing {lose}: weights and normalizer the same: {same}"
