"""The GPU-ready settings on the CPU: autocast dtypes, loss scaling only for fp16,
channels_last inputs, torch.compile, decoding ahead, batches copied ahead, and one host
sync per step instead of one per logged value."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from configs import PseudoLabelConfig, TrainConfig
from engine import loop
from engine.loop import CHECKPOINT, fit, to_device_ahead
from nets.backbone import model_input
from tests.conftest import tiny_model_config


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def batches(start):
    g = torch.Generator().manual_seed(start)
    while True:
        x = torch.randn(4, 3, 8, 8, generator=g)
        yield {"images": x, "y": x.mean((1, 2, 3))[:, None]}


def train(tmp_path, seen_dtypes=None, model=None, **cfg):
    def step_loss(net, batch):
        out = net(model_input(batch["images"], net))
        if seen_dtypes is not None:
            seen_dtypes.append(out.dtype)
        loss = ((out.float() - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.detach()}

    torch.manual_seed(0)
    model = (model or ConvNet)()
    tcfg = TrainConfig(steps=4, batch_size=4, warmup_steps=0, lr=0.01, checkpoint_every=2, log_every=2, **cfg)
    result = fit(tmp_path, model, batches, step_loss, tcfg, "cpu", key="k", log=lambda m: None)
    return model, result


def test_amp_names_a_dtype_and_true_means_bf16():
    assert TrainConfig(amp=True).amp == "bf16" and TrainConfig(amp=False).amp == "off"
    assert PseudoLabelConfig(amp="fp16").amp == "fp16"
    with pytest.raises(ValidationError, match="fp8"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValidationError, match="fastest"):
        TrainConfig(compile="fastest")


@pytest.mark.parametrize("amp, dtype, scaled", [("off", torch.float32, False), ("bf16", torch.bfloat16, False)])
def test_autocast_runs_the_step_in_its_dtype_and_scales_only_fp16(tmp_path, amp, dtype, scaled):
    seen = []
    model, result = train(tmp_path, seen, amp=amp)
    assert set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert result["step"] == 4 and torch.isfinite(torch.tensor(result["last"]["loss"]))
    scaler = torch.load(tmp_path / CHECKPOINT, weights_only=True)["scaler"]
    assert bool(scaler) == scaled  # a disabled GradScaler saves an empty state


def test_fp16_trains_with_a_grad_scaler(tmp_path):
    seen = []
    _, result = train(tmp_path, seen, amp="fp16")
    assert set(seen) == {torch.float16}
    assert result["step"] == 4
    scaler = torch.load(tmp_path / CHECKPOINT, weights_only=True)["scaler"]
    assert scaler["scale"] > 0


def test_channels_last_model_gets_channels_last_inputs_and_the_same_loss(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    net = ConvNet()
    assert model_input(x, net).is_contiguous()
    net.to(memory_format=torch.channels_last)
    y = model_input(x, net)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    _, plain = train(tmp_path / "a")
    _, last = train(tmp_path / "b", channels_last=True)
    assert last["last"]["loss"] == pytest.approx(plain["last"]["loss"], rel=1e-4)


def test_channels_last_detection_loss_matches(tmp_path):
    from detection.family import DetectionFamily

    family = DetectionFamily()
    torch.manual_seed(0)
    model = family.build_model(tiny_model_config())
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]])
    targets = [{"boxes_xyxy": boxes, "labels": torch.tensor([1])}] * 2
    batch = {"images": images, "targets": targets}
    plain = {k: v.detach() for k, v in family.losses(model, batch).items()}
    model.to(memory_format=torch.channels_last)
    last = family.losses(model, batch)
    for k in plain:
        assert torch.allclose(plain[k], last[k].detach(), rtol=1e-4, atol=1e-5), k


def test_logs_are_read_back_only_on_steps_that_log(tmp_path, monkeypatch):
    """Per step one sync (the guard); log values are materialized at log or checkpoint steps only."""
    calls = []
    real = loop._materialize
    monkeypatch.setattr(loop, "_materialize", lambda logs: calls.append(1) or real(logs))
    seen = []

    def step_loss(net, batch):
        loss = ((net(batch["images"]) - batch["y"]) ** 2).mean()
        seen.append(isinstance(loss, torch.Tensor))
        return loss, {"loss": loss.detach(), "half": loss.detach() / 2}

    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=0, checkpoint_every=5, log_every=5)
    lines = []
    result = fit(tmp_path, ConvNet(), batches, step_loss, cfg, "cpu", key="k", log=lines.append)
    assert len(seen) == 10 and len(calls) == 2  # steps 5 and 10
    assert result["last"]["half"] == pytest.approx(result["last"]["loss"] / 2)
    assert sum(ln.startswith("step ") for ln in lines) == 2 and "half=" in lines[-1]


@pytest.mark.slow
def test_compile_trains_to_the_eager_loss(tmp_path):
    """Inductor on the CPU (a C++ compiler builds the kernels): tens of seconds, hence slow."""
    _, eager = train(tmp_path / "eager")
    _, compiled = train(tmp_path / "compiled", compile="default")
    assert compiled["step"] == 4
    assert compiled["last"]["loss"] == pytest.approx(eager["last"]["loss"], rel=1e-4)


def test_to_device_ahead_keeps_order_and_reads_one_batch_ahead():
    pulled = []

    def source():
        for i in range(4):
            pulled.append(i)
            yield {"images": torch.full((2,), float(i)), "targets": [i]}

    it = to_device_ahead(source(), torch.device("cpu"), pin=False)
    first = next(it)
    assert first["images"].tolist() == [0.0, 0.0] and first["targets"] == [0]
    assert pulled == [0, 1]  # batch 1 is on its way while batch 0 trains
    rest = [b["targets"][0] for b in it]
    assert rest == [1, 2, 3]


def test_decode_threads_give_the_batches_of_one_thread_in_order(tmp_path):
    import io

    from PIL import Image

    from data.shards import write_shard
    from engine.labeling import _decoded_batches

    def jpeg(value):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (value, 255 - value, 0)).save(buf, format="JPEG")
        return buf.getvalue()

    shard = tmp_path / "pool.tar"
    records = [(f"img{i:03d}", {"jpg": jpeg(9 * i)}) for i in range(23)]
    records.insert(7, ("broken", {"jpg": b"\xff\xd8 not a jpeg"}))
    write_shard(shard, records)

    def run(threads):
        damage = []
        out = list(_decoded_batches(str(shard), 5, damage, threads))
        assert damage == []
        return out

    one, four = run(1), run(4)
    assert [b[0] for b in four] == [b[0] for b in one]
    assert sum(len(b[0]) for b in one) == 23 and [b[2] for b in one][1] == ["broken"]
    assert sum(b[3] for b in one) == 0  # nothing above the pixel limit
    for (_, a, _, _), (_, b, _, _) in zip(one, four):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
