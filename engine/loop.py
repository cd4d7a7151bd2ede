"""The training engine: one linear `fit()` that always resumes from its stage directory.

No Prefect here: the teacher and student tasks wrap `fit` and pass a `log` callable.
State saved every `checkpoint_every` steps (atomically) in `<stage>/checkpoint.pt`:
model, optimizer, schedule position, extra state (the loss normalizer), and the
digest of the stage's inputs, so a checkpoint of other inputs is never resumed. That
digest leaves out how the stage runs (`processes` among it): with the same global
batch, a checkpoint resumes on another number of processes.

A loss, gradient norm or weight that is not finite stops the stage before the step's
update with a `TrainingDiverged` naming the step and the loss parts. The last good
checkpoint stays as it is; `<stage>/diverged.json` records the stop, and
`checkpoint-diverged.pt` (a hard link) keeps that checkpoint once a rerun replaces
checkpoint.pt. A rerun whose inputs differ only in the learning rate (its `resume_key`,
the digest of the inputs without lr, equals the checkpoint's) resumes from it.

The same `fit` runs in every training process (engine/distributed.py): every rank
resumes from the checkpoint, the model trains as a DistributedDataParallel replica,
logged values and the loss normalizer's averages are means over ranks (so every rank
holds the same state), and only rank 0 writes the checkpoint. With one process the
distributed helpers are the identity.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.profiler import record_function

from configs import TrainConfig
from data import files, storage
from engine import distributed
from engine.rundir import atomic_torch_save, atomic_write_json, read_json

CHECKPOINT = "checkpoint.pt"
DIVERGED = "diverged.json"
DIVERGED_CHECKPOINT = "checkpoint-diverged.pt"


class TrainingDiverged(FloatingPointError, distributed.RankError):
    """A non-finite `what` (the loss, the gradient norm, a weight) at 1-based `step` of
    `steps`: training stopped before that step's update. `logs` holds the step's loss
    parts; `checkpoint_step` is the step of the last good checkpoint (None: none was
    written); `setting` is the config path of the learning rate, for the advice."""

    def __init__(
        self,
        what: str,
        step: int,
        steps: int,
        logs: dict,
        lr: float,
        stage_dir: str,
        checkpoint_step: int | None,
        setting: str = "lr",
    ):
        self.what, self.step, self.steps, self.logs, self.lr = what, step, steps, dict(logs), lr
        self.stage_dir, self.checkpoint_step, self.setting = str(stage_dir), checkpoint_step, setting
        super().__init__(what, step)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in self.logs.items())
        lower = f"rerun with a lower learning rate (e.g. --set {self.setting}={self.lr / 2:.3g})"
        if self.checkpoint_step:
            then = (
                f"the last good checkpoint (step {self.checkpoint_step}) is kept in "
                f"{storage.join(self.stage_dir, CHECKPOINT)}: {lower} to resume from it"
            )
        else:
            then = f"no checkpoint was written before it: {lower} to start again"
        return f"{self.what} is not finite at step {self.step}/{self.steps} ({parts}) with lr={self.lr:g}; {then}"

    def __reduce__(self):
        return type(self), (
            self.what,
            self.step,
            self.steps,
            self.logs,
            self.lr,
            self.stage_dir,
            self.checkpoint_step,
            self.setting,
        )


def _diverged_run_resumes(stage_dir: Path, state: dict, resume_key: str | None) -> bool:
    """Whether `state` is the last good checkpoint of a run that diverged, and this run
    differs from it in the learning rate only."""
    record = read_json(stage_dir / DIVERGED) or {}
    return (
        resume_key is not None
        and state.get("resume_key") == resume_key
        and record.get("key") == state.get("key")
        and record.get("checkpoint_step") == state.get("step")
    )


def _keep_diverged_checkpoint(ckpt_path: Path) -> None:
    """`checkpoint-diverged.pt` beside `ckpt_path`: a hard link (a copy where links fail)."""
    files.copy(ckpt_path, ckpt_path.with_name(DIVERGED_CHECKPOINT))


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LossNormalizer:
    """Joint loss of a mixed batch (Zoph et al. 2020, Sec. 3.3; docs/design.md, Mixed batches).

    normalized: L = 1/(1+a) * (L_h + a * (mavg(L_h) / mavg(L_p)) * L_p)
    plain:      L = L_h + a * L_p
    mavg is an exponential moving average with `decay`, updated with the detached
    current values before use. Each average starts at the first positive value it
    sees and ignores the values before it: a first pseudo loss of 0 (say, crops that
    are all ignore) would otherwise make the ratio huge for hundreds of steps. Until
    both averages have started the ratio is 1. With several processes the averages
    see the means of L_h and L_p over all ranks, so every rank holds the same state
    and the same ratio.
    """

    def __init__(self, alpha: float = 1.0, decay: float = 0.99, enabled: bool = True):
        self.alpha, self.decay, self.enabled = alpha, decay, enabled
        # float64 [mavg(L_h), mavg(L_p)] on the losses' device, NaN where an average has
        # not started: the update stays on the device (no host sync per step).
        self._avg: torch.Tensor | None = None

    def _value(self, i: int) -> float | None:
        if self._avg is None:
            return None
        v = float(self._avg[i])
        return None if math.isnan(v) else v

    @property
    def mavg_h(self) -> float | None:
        return self._value(0)

    @property
    def mavg_p(self) -> float | None:
        return self._value(1)

    @staticmethod
    def _ratio(avg: torch.Tensor) -> torch.Tensor:
        return torch.where(avg.isnan().any(), torch.ones_like(avg[0]), avg[0] / avg[1].clamp(min=1e-12))

    @property
    def ratio(self) -> float:
        """mavg(L_h) / mavg(L_p), or 1 while either average has not started."""
        return 1.0 if self._avg is None else float(self._ratio(self._avg))

    def __call__(self, loss_h: torch.Tensor, loss_p: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return loss_h + self.alpha * loss_p
        current = distributed.average_over_ranks(torch.stack([loss_h.detach(), loss_p.detach()]).double())
        avg = torch.full_like(current, math.nan) if self._avg is None else self._avg.to(current.device)
        fresh = torch.where(current > 0, current, torch.full_like(current, math.nan))
        self._avg = torch.where(avg.isnan(), fresh, self.decay * avg + (1 - self.decay) * current)
        ratio = self._ratio(self._avg).to(loss_p.dtype)
        return (loss_h + self.alpha * ratio * loss_p) / (1 + self.alpha)

    def state_dict(self) -> dict:
        return {"mavg_h": self.mavg_h, "mavg_p": self.mavg_p}

    def load_state_dict(self, state: dict) -> None:
        values = [math.nan if state[k] is None else float(state[k]) for k in ("mavg_h", "mavg_p")]
        self._avg = (
            None if state["mavg_h"] is None and state["mavg_p"] is None else torch.tensor(values, dtype=torch.float64)
        )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and normalization parameters (1-d tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    match cfg.optimizer:
        case "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
        case "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over warmup_steps, then cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20
_tuned_allocator = False


def tune_host_allocator() -> bool:
    """Keep freed activation memory in this process instead of handing it back to the OS.

    A CPU training step frees and re-allocates the same activation buffers every step.
    With glibc's defaults, large blocks come from fresh mmaps and freed heap tops are
    trimmed, so every step faults its pages in again and the kernel zeroes them: a
    B0 + NAS-FPN step of 32 images at 128 px took about 170,000 page faults. These
    settings serve every block from the heap (no mmap) and keep up to 1 GiB of free
    heap top: the same step took about 9,000 and ran 1.3x faster
    (benchmarks/cpu_settings.py). The cost: the process keeps its peak heap.
    glibc's `mallopt` is the standard switch for this; other C libraries are left alone.
    Process-wide and idempotent; returns whether the settings are in force.
    """
    global _tuned_allocator
    if _tuned_allocator:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    _tuned_allocator = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _tuned_allocator


def device_settings(device: str | torch.device, cudnn_benchmark: bool, host_allocator: str) -> None:
    """Process-wide settings of a device: on CUDA, cuDNN's kernel search for fixed sizes;
    host_allocator="tuned" keeps freed host memory in the process (`tune_host_allocator`;
    a process once tuned stays tuned)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    if host_allocator == "tuned":
        tune_host_allocator()


# The phases of a training step, as torch.profiler shows them (benchmarks/profile_step.py).
STEP_PHASES = ("next_batch", "forward_and_loss", "backward", "guard", "optimizer_step")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """torch.autocast at `precision` ("bf16", "fp16"), or nothing for "off"."""
    if precision == "off":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def _materialize(logs: dict[str, Any]) -> dict[str, float]:
    """Log values (floats or 0-d tensors) as floats: one host sync for all tensors."""
    tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return dict(logs)
    values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
    return {**logs, **dict(zip(tensors, values))}


def _mean_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Log values as floats, each averaged over ranks (a collective: every rank calls it
    at the same steps)."""
    return distributed.mean_over_ranks(_materialize(logs))


def to_device_ahead(batches: Iterator[dict], device: torch.device, pin: bool) -> Iterator[dict]:
    """The batches with their top-level tensors on `device`, each copied one batch ahead:
    batch N+1 is pinned (`pin`) and its non-blocking copy queued before step N runs, so
    the host prepares it while the device computes."""

    def move(batch: dict) -> dict:
        return {
            k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    ahead = None
    for batch in batches:
        if ahead is not None:
            current, ahead = ahead, move(batch)
            yield current
        else:
            ahead = move(batch)
    if ahead is not None:
        yield ahead


StepFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


def fit(
    stage_dir: str | Path,
    model: nn.Module,
    make_batches: Callable[[int], Iterator[dict]],
    step_loss: StepFn,
    cfg: TrainConfig,
    device: str | torch.device,
    key: str,
    extra_state: dict[str, Stateful] | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume_key: str | None = None,
) -> dict[str, Any]:
    """Train `model` for `cfg.steps` steps, resuming from `<stage_dir>/checkpoint.pt`.

    make_batches(start_step) -> endless iterator of batches (seeded by start_step).
    step_loss(model, batch) -> (scalar loss, {name: float or 0-d tensor}) for logging;
    `model` is the module being trained (a DDP replica with several processes, compiled
    with cfg.compile). Tensors are read back only on the steps that log, checkpoint or
    call on_step; each step syncs once, to check the loss and gradient norm.
    key: digest of the stage's inputs; a checkpoint with another key is ignored, unless
    it is the last good one of a diverged run and `resume_key` (the digest of the inputs
    without the learning rate) is its resume key.
    on_step(step, logs): called after every optimizer step (hooks: tests, progress).
    With several processes (engine/distributed.py) each rank calls fit with its own
    batches (its share of the global batch); logs are means over ranks.
    Raises TrainingDiverged on a loss, gradient norm or weight that is not finite.
    Returns {"step", "resumed_from", "seconds", "images_per_s" (all ranks), "processes",
    "last": logs}.
    """
    stage_dir = storage.path(stage_dir)
    storage.makedirs(stage_dir)
    device = torch.device(device)
    extra_state = extra_state or {}
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    # Loss scaling only for fp16, whose range needs it; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start = 0
    ckpt_path = stage_dir / CHECKPOINT
    if storage.exists(ckpt_path):
        state = storage.torch_load(ckpt_path, map_location=device, weights_only=True)
        if state.get("key") == key or _diverged_run_resumes(stage_dir, state, resume_key):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            for name, obj in extra_state.items():
                obj.load_state_dict(state["extra"][name])
            start = int(state["step"])
            if state.get("key") == key:
                log(f"resuming from {ckpt_path} at step {start}/{cfg.steps}")
            else:
                log(
                    f"resuming from {ckpt_path} at step {start}/{cfg.steps}, the last good checkpoint of a run "
                    f"that diverged with lr={state.get('lr')}; now lr={cfg.lr:g}"
                )
        else:
            log(f"ignoring {ckpt_path}: it belongs to other inputs")

    net = distributed.prepare_model(model, device, cfg.sync_batchnorm)
    if cfg.compile != "off":
        net = torch.compile(net, mode=None if cfg.compile == "default" else cfg.compile)
    ranks = distributed.world_size()
    if start:
        # A checkpoint holds no per-rank state: like the data streams, the noise drawn
        # from the global RNG (dropout, drop path, in-process augmentation) continues as a
        # fresh stream of (seed, start step, rank), not a replay of step 0's, so a stage
        # resumes on any number of processes.
        torch.manual_seed(distributed.rank_seed(cfg.seed * 1_000_003 + start))

    saved = start or None  # step of the last good checkpoint
    # Logs are averaged over ranks (a collective) on the same steps everywhere: every step
    # if any rank has an on_step hook (with several processes only rank 0 has it).
    every_step = distributed.average_over_ranks(torch.tensor([float(on_step is not None)])).item() > 0

    def diverged(what: str, step: int, logs: dict[str, float]) -> TrainingDiverged:
        """Record the stop (rank 0) and the error every rank raises."""
        if distributed.is_main():
            if saved:
                _keep_diverged_checkpoint(ckpt_path)
            atomic_write_json(
                stage_dir / DIVERGED,
                {
                    "key": key,
                    "resume_key": resume_key,
                    "what": what,
                    "step": step,
                    "steps": cfg.steps,
                    "lr": cfg.lr,
                    "logs": logs,
                    "checkpoint_step": saved,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        return TrainingDiverged(what, step, cfg.steps, logs, cfg.lr, str(stage_dir), saved)

    def save(step: int, logs: dict[str, float]) -> None:
        nonlocal saved
        # An update can turn weights non-finite with a finite loss; such weights are no checkpoint.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise diverged("a weight", step, logs)
        saved = step
        if not distributed.is_main():
            return
        atomic_torch_save(
            {
                "key": key,
                "resume_key": resume_key,
                "lr": cfg.lr,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "extra": {n: o.state_dict() for n, o in extra_state.items()},
            },
            ckpt_path,
        )

    net.train()
    batches = make_batches(start) if start < cfg.steps else iter(())
    if device.type == "cuda":
        batches = to_device_ahead(batches, device, pin=True)
    t0 = time.perf_counter()
    images, logs = 0, {}
    window_t, window_images = t0, 0
    for step in range(start, cfg.steps):
        with record_function("next_batch"):
            batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        with record_function("forward_and_loss"), autocast(device, cfg.amp):
            loss, logs = step_loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            scaler.scale(loss).backward()
        # One host sync per step, before the update: the loss and the gradient norm, averaged
        # over ranks (one all-reduce), so every rank stops together on a bad value. The
        # log values stay on the device until a step logs them.
        with record_function("guard"):
            guard = [loss.detach().float()]
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                guard.append(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).float())
            checked = distributed.average_over_ranks(torch.stack(guard)).tolist()
        total = checked[0]
        if not math.isfinite(total):
            raise diverged("the loss", step + 1, {"loss": total, **_mean_logs(logs)})
        if cfg.grad_clip is not None:
            logs["grad_norm"] = checked[1]
            # With a GradScaler an infinite norm is expected now and then (it skips that step).
            if not scaler.is_enabled() and not math.isfinite(logs["grad_norm"]):
                raise diverged("the gradient norm", step + 1, _mean_logs(logs))
        with record_function("optimizer_step"):
            scaler.step(optimizer)
            scaler.update()
        n = len(batch["images"]) * ranks
        images += n
        window_images += n
        done = step + 1
        last = done == cfg.steps
        if every_step or last or done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0:
            logs = _mean_logs(logs)
        if done % cfg.log_every == 0 or last:
            now = time.perf_counter()
            rate = window_images / max(now - window_t, 1e-9)
            window_t, window_images = now, 0
            parts = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
            log(f"step {done}/{cfg.steps} lr={optimizer.param_groups[0]['lr']:.3g} {parts} ({rate:.1f} img/s)")
        if done % cfg.checkpoint_every == 0 or last:
            save(done, logs)
        if on_step is not None:
            on_step(done, logs)
    seconds = time.perf_counter() - t0
    return {
        "step": cfg.steps,
        "resumed_from": start,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 and images else 0.0,
        "processes": ranks,
        "last": logs,
    }
