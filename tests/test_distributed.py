"""Training on 2 processes (gloo, CPU) is the 1-process training of the same global batch.

The data are identical by design: with augmentation "none", rank r of N takes block r
of each step's global batch in the one shared sample order, so the two ranks' batches
of a step together are the 1-process batch. The tiny backbone has BatchNorm; with
`sync_batchnorm` (the default) its statistics cover the global batch, as with one
process. Measured here: each loss of the 3-step curve equal to ~2e-7 relative (and ~1e-4
after 4 steps); without synchronized BatchNorm the first step is already 3.6% off.
"""

import copy
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from pydantic import ValidationError
from torch import nn

from configs import RunConfig, StudentConfig, TrainConfig
from data.mixing import InfiniteSampler, PseudoLabeledShards, endless_loader
from data.shards import iter_shard, write_shard
from detection import pseudo
from engine import distributed, launcher, training
from engine.loop import CHECKPOINT, LossNormalizer
from tests.conftest import tiny_model_config, world_data

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


class Crash(RuntimeError):
    pass


def teacher_config(world, processes: int, **kw) -> RunConfig:
    train = TrainConfig(
        steps=STEPS,
        batch_size=4,
        augment_level="none",
        warmup_steps=0,
        lr=3e-3,
        checkpoint_every=1,
        log_every=1,
        processes=processes,
        **kw,
    )
    return RunConfig(data=world_data(world), model=tiny_model_config(), teacher=train)


def crash_and_resume(cfg: RunConfig, stage_dir) -> dict:
    """Train, stop after step 1 (a hook raises in this process), then rerun: it resumes."""
    first, logs_first = [], []

    def crash_at_1(step, logs):
        first.append(logs["loss"])
        if step == 1:
            raise Crash

    with pytest.raises(Crash):
        training.train_teacher(cfg, stage_dir, "k", log=logs_first.append, on_step=crash_at_1)
    listing = sorted(p.name for p in stage_dir.iterdir())
    step_after_crash = torch.load(stage_dir / CHECKPOINT, weights_only=True)["step"]
    resumed, logs_resumed = {}, []
    result = training.train_teacher(
        cfg, stage_dir, "k", log=logs_resumed.append, on_step=lambda s, logs: resumed.__setitem__(s, logs["loss"])
    )
    return {
        "first": first,
        "resumed": resumed,
        "result": result,
        "logs_first": logs_first,
        "logs_resumed": logs_resumed,
        "listing_after_crash": listing,
        "step_after_crash": step_after_crash,
        "dir": stage_dir,
    }


@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory):
    """The same training on 1 and on 2 processes, each stopped after step 1 and resumed.

    A resumed stage draws a fresh data stream seeded by its start step (engine/loop.py),
    so the 2-process run is compared with a 1-process run that stopped and resumed alike.
    """
    one = crash_and_resume(teacher_config(small_world, 1), tmp_path_factory.mktemp("one"))
    two = crash_and_resume(teacher_config(small_world, 2), tmp_path_factory.mktemp("two"))
    return {"one": one, "two": two}


def curve(run: dict) -> list[float]:
    """Losses of step 1 (first run) and steps 2-3 (after resuming from step 1)."""
    return run["first"] + [run["resumed"][s] for s in range(2, STEPS + 1)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def test_two_processes_follow_the_one_process_loss_curve(runs):
    one, two = runs["one"], runs["two"]
    assert len(one["first"]) == len(two["first"]) == 1
    assert rel(one["first"][0], two["first"][0]) < 1e-5  # same data, same init: the same first loss
    assert all(rel(a, b) < 1e-3 for a, b in zip(curve(one), curve(two))), (curve(one), curve(two))
    assert len({round(v, 3) for v in curve(one)}) == STEPS  # the loss moves: the steps did train


def test_every_rank_resumes_from_the_checkpoint(runs):
    two = runs["two"]
    assert two["step_after_crash"] == 1  # rank 0 waited for the hook of step 1 (no checkpoint of step 2)
    assert two["result"]["resumed_from"] == 1 and two["result"]["processes"] == 2
    assert sorted(two["resumed"]) == [2, 3]
    # after resuming, both ranks continue from the checkpoint exactly as one process does
    assert rel(runs["one"]["resumed"][2], two["resumed"][2]) < 1e-4


def test_rank_zero_writes_the_only_checkpoint_and_model(runs):
    two_dir = runs["two"]["dir"]
    assert runs["two"]["listing_after_crash"] == [CHECKPOINT]
    assert sorted(p.name for p in two_dir.iterdir()) == [CHECKPOINT, training.MODEL_FILE]
    ckpt = torch.load(two_dir / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["key"] == "k"
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the module, not its DDP replica
    _, model = training.load_model(two_dir / training.MODEL_FILE)
    one = torch.load(runs["one"]["dir"] / training.MODEL_FILE, weights_only=True)["state"]
    # Adam moves a weight by up to about lr (3e-3) per step whatever the size of its
    # gradient, so float noise in a near-zero gradient can shift a few elements by that
    # much over 3 steps; the bulk of the weights must agree far more closely.
    total, count = 0.0, 0
    for name, value in model.state_dict().items():
        assert torch.allclose(value.float(), one[name].float(), atol=6e-3), name
        total += (value.float() - one[name].float()).abs().sum().item()
        count += value.numel()
    assert total / count < 1e-4


def test_logs_come_from_rank_zero_only(runs):
    two = runs["two"]
    for logs in (two["logs_first"], two["logs_resumed"]):
        assert sum(m.startswith("teacher: 8 labeled images") for m in logs) == 1, logs
        assert "on 2 processes of 2" in next(m for m in logs if m.startswith("teacher:"))
    assert sum("resuming from" in m for m in two["logs_resumed"]) == 1


# --------------------------------------------------------------------------- errors


def test_indivisible_batch_is_refused_with_both_values(small_world, tmp_path):
    with pytest.raises(ValidationError, match="batch_size=6 is not divisible by processes=4"):
        TrainConfig(batch_size=6, processes=4)
    student = StudentConfig(train=TrainConfig(batch_size=4, processes=2), pseudo_ratio=0.75)  # 3 pseudo
    cfg = RunConfig(data=world_data(small_world), model=tiny_model_config(), student=student)
    with pytest.raises(ValueError, match=r"pseudo images per batch .*=3 is not divisible by processes=2"):
        training.train_student(cfg, tmp_path, "k", [("a.tar", "b.tar")], "teacher.pt", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # refused before any process started


def fail_on_rank(bad_rank: int, *, device, log, on_step):
    if distributed.rank() == bad_rank:
        raise ValueError(f"boom on rank {bad_rank}")
    distributed.barrier()  # the healthy rank waits here until the launcher stops it


def test_worker_exception_names_its_rank():
    with pytest.raises(distributed.WorkerError, match=r"rank 1 failed: ValueError: boom on rank 1") as err:
        launcher.launch(fail_on_rank, (1,), processes=2, device="cpu")
    assert err.value.rank == 1 and "fail_on_rank" in err.value.trace


def killed_on_rank(bad_rank: int, *, device, log, on_step):
    if distributed.rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    distributed.barrier()


def test_a_rank_killed_by_a_signal_is_named_not_its_peer():
    """The killed rank files no report; its peer fails on the closed connection and does."""
    with pytest.raises(distributed.WorkerError, match=r"rank 1 failed: process died without an error") as err:
        launcher.launch(killed_on_rank, (1,), processes=2, device="cpu")
    assert err.value.rank == 1 and "SIGKILL" in err.value.detail


def test_a_queue_lock_left_taken_by_a_stopped_rank_does_not_hold_the_launcher_at_exit():
    """A rank stopped in the middle of a put leaves its queue's shared write lock taken;
    the launcher's next put then waits on it in a feeder thread. The launcher's process
    must still exit (multiprocessing joins feeder threads at shutdown unless told not to)."""
    code = textwrap.dedent(
        """
        import multiprocessing
        from engine import launcher
        channel = launcher._Channel(multiprocessing.get_context(launcher.START_METHOD), want_steps=True)
        channel.replies._wlock.acquire()  # what a rank stopped mid-put leaves behind
        channel.replies.put("go")
        print("exiting", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr


# --------------------------------------------------------------------------- state across ranks


def normalizer_states(*, device, log, on_step):
    """Feed rank-dependent losses; return every rank's normalizer state and loss (to rank 0)."""
    norm = LossNormalizer(alpha=2.0, decay=0.5)
    r = distributed.rank()
    losses = []
    for step in range(3):
        loss = norm(torch.tensor(1.0 + r + step), torch.tensor(4.0 - 2 * r))
        losses.append(loss.item())
    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, (norm.state_dict(), losses))
    return gathered


def test_loss_normalizer_sees_the_mean_over_ranks():
    (state0, losses0), (state1, losses1) = launcher.launch(normalizer_states, (), processes=2, device="cpu")
    assert state0 == state1  # every rank holds the same averages
    alone = LossNormalizer(alpha=2.0, decay=0.5)
    for step in range(3):  # one process seeing the means of the two ranks' losses
        alone(torch.tensor(1.5 + step), torch.tensor(3.0))
    assert state0 == pytest.approx(alone.state_dict())
    # the mean of the ranks' losses is the one-process loss of the mean losses
    ratio = state0["mavg_h"] / state0["mavg_p"]
    assert (losses0[-1] + losses1[-1]) / 2 == pytest.approx((3.5 + 2 * ratio * 3.0) / 3)


def test_batchnorm_conversion_keeps_weights_and_outputs():
    from nets.backbone import build_backbone

    torch.manual_seed(0)
    plain = build_backbone("test_efficientnet")
    synced = copy.deepcopy(plain)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert distributed.sync_batchnorm(synced, torch.device("cpu")) == n_bn > 0
    assert all(
        type(m) is distributed.CrossRankBatchNorm
        for m in synced.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert list(synced.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):  # one process: plain BatchNorm, activations kept
        plain.train(mode), synced.train(mode)
        a, b = plain(x), synced(x)
        assert all(torch.equal(a[k], b[k]) for k in a), mode


@pytest.fixture
def one_rank_group():
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_cross_rank_statistics_are_batchnorm_statistics(one_rank_group):
    """The all-reduce path (here over one rank) computes BatchNorm: output, gradients, running stats."""
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    ours = distributed.CrossRankBatchNorm(5, momentum=0.3)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 5, 4, 6) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), ours._across_ranks(x2)
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    assert torch.allclose(x2.grad, x.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-5)
    assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).float(), getattr(ref, name).float(), atol=1e-5), name


# --------------------------------------------------------------------------- data split by rank


def test_human_batches_of_two_ranks_make_the_one_process_batch():
    for block in (1, 3):
        whole = iter(InfiniteSampler(10, seed=5))
        ranks = [iter(InfiniteSampler(10, seed=5, rank=r, world_size=2, block=block)) for r in range(2)]
        for _ in range(12):  # 12 global batches, crossing passes over the data
            global_batch = [next(whole) for _ in range(2 * block)]
            assert [next(ranks[0]) for _ in range(block)] + [next(ranks[1]) for _ in range(block)] == global_batch


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return i


def test_endless_loader_splits_the_global_batch():
    one = endless_loader(Indexed(), 4, 0, seed=2)
    two = [endless_loader(Indexed(), 2, 0, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        assert next(two[0]) + next(two[1]) == next(one)


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (value, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def sidecars(world, out_dir) -> list[tuple[str, str]]:
    """A pseudo-label (one box) for every image of the world's unlabeled shards."""
    label = {"boxes_xyxy": torch.tensor([[4.0, 4, 60, 50]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    pairs = []
    for i, shard in enumerate(sorted(world.root.glob("unlabeled/pool-*.tar"))):
        keys = [key for key, _ in iter_shard(shard)]
        side = out_dir / f"labels-{i:06d}.tar"
        write_shard(side, [(k, {"json": pseudo.encode(label)}) for k in keys])
        pairs.append((str(shard), str(side)))
    return pairs


@pytest.mark.parametrize("n_shards", [3, 1])  # enough shards to split, and fewer shards than ranks
def test_pseudo_stream_is_split_by_rank_without_overlap(tmp_path, n_shards):
    pairs = []
    for s in range(n_shards):
        keys = [f"s{s}_{i}" for i in range(4)]
        images, side = tmp_path / f"pool-{s}.tar", tmp_path / f"labels-{s}.tar"
        write_shard(images, [(k, {"jpg": jpeg(60 * s + 10 * i)}) for i, k in enumerate(keys)])
        write_shard(
            side,
            [
                (
                    k,
                    {
                        "json": pseudo.encode(
                            {
                                "boxes_xyxy": torch.tensor([[1.0, 1, 9, 9]]),
                                "labels": torch.tensor([s * 4 + i]),
                                "scores": torch.tensor([0.9]),
                            }
                        )
                    },
                )
                for i, k in enumerate(keys)
            ],
        )
        pairs.append((str(images), str(side)))

    def ids(rank, world, seed=0):
        stream = PseudoLabeledShards(
            pairs, pseudo.decode, "json", "none", 128, seed=seed, loop=False, rank=rank, world_size=world
        )
        return [int(t["labels"][0]) for _, t in stream]

    everything = sorted(ids(0, 1))
    assert everything == list(range(4 * n_shards))
    rank0, rank1 = ids(0, 2), ids(1, 2)
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == everything
    assert ids(1, 2) == rank1  # deterministic for a seed
    with pytest.raises(ValueError, match="rank=2"):
        PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, rank=2, world_size=2)


def test_student_trains_on_two_processes(small_world, tmp_path):
    pairs = sidecars(small_world, tmp_path)
    train = TrainConfig(
        steps=2, batch_size=2, augment_level="none", warmup_steps=0, lr=1e-3, checkpoint_every=2, processes=2
    )
    cfg = RunConfig(
        data=world_data(small_world), model=tiny_model_config(), student=StudentConfig(train=train, alpha=1.0)
    )
    seen = []
    stage = tmp_path / "student"
    result = training.train_student(
        cfg, stage, "k", pairs, "unused.pt", log=lambda m: None, on_step=lambda s, logs: seen.append(logs)
    )
    assert result["step"] == 2 and result["processes"] == 2 and len(seen) == 2
    assert all(set(logs) >= {"loss", "loss_h", "loss_p"} for logs in seen)
    state = torch.load(stage / CHECKPOINT, weights_only=True)["extra"]["normalizer"]
    assert state["mavg_h"] > 0 and state["mavg_p"] > 0
    assert training.load_model(stage / training.MODEL_FILE)[1] is not None


def test_checkpoint_resumes_on_another_number_of_processes(small_world, tmp_path):
    """The stage key leaves `processes` out: a 1-process checkpoint resumes on 2 processes
    (same global batch) and continues as a 1-process resume of it does."""
    import shutil

    from engine.rundir import json_digest
    from flows.stages import teacher_inputs

    one_cfg, two_cfg = teacher_config(small_world, 1), teacher_config(small_world, 2)
    key = json_digest(teacher_inputs(one_cfg))
    assert json_digest(teacher_inputs(two_cfg)) == key
    first = tmp_path / "first"

    def crash_at_1(step, logs):
        if step == 1:
            raise Crash

    with pytest.raises(Crash):
        training.train_teacher(one_cfg, first, key, log=lambda m: None, on_step=crash_at_1)
    shutil.copytree(first, tmp_path / "again")
    losses = {}
    for name, cfg, stage in (("one", one_cfg, tmp_path / "again"), ("two", two_cfg, first)):
        seen = losses.setdefault(name, {})
        result = training.train_teacher(
            cfg,
            stage,
            json_digest(teacher_inputs(cfg)),
            log=lambda m: None,
            on_step=lambda s, logs, seen=seen: seen.__setitem__(s, logs["loss"]),
        )
        assert result["resumed_from"] == 1 and result["processes"] == cfg.teacher.processes
    assert sorted(losses["two"]) == [2, 3]
    assert rel(losses["one"][2], losses["two"][2]) < 1e-4, losses
