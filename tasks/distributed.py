"""Training on several processes with torch.distributed (DESIGN.md section 9). No Prefect here.

`launch(fn, args, processes, device, backend, log, on_step)` runs
`fn(*args, device=, log=, on_step=)` once per rank and returns rank 0's result.

- processes=1: `fn` runs in this process. No process group exists, `rank()` is 0,
  `world_size()` is 1, and every helper below is the identity: the training code is
  the same functions for 1 and N processes.
- processes=N: N ranks start from multiprocessing's fork server, rank r on `cuda:(i+r)`
  for device `cuda:i` (backend nccl) or on the CPU (gloo). They meet through a
  TCPStore that this process serves on 127.0.0.1 at a port the OS picks, so there is no
  free-port race. Rank 0's `log` lines and `on_step` calls travel back here over a
  queue and run in this process (so a Prefect logger works); on_step runs synchronously
  (rank 0 waits for it), so a hook that raises stops training right after that step,
  as with one process. Other ranks do not log.
- A rank that raises or dies ends the launch: the others are stopped and `WorkerError`
  names the rank and its exception (with the rank's traceback). When one rank fails,
  the others soon fail too (their peer closed the connection); each failing rank
  stamps its report with the time, and the first one is the one named. A `RankError`
  (an error whose message says all, such as a diverged loss) is raised as it is.

Why not torchrun: its ranks are fresh interpreters that would re-import torch, timm
and the model code (about 15 s each on a busy 2-core machine) and re-read the config
from a file; results and failures would come back through files and exit codes.
Forked from a server that has imported the training module (once per launching
process), a rank starts in about half a second, takes the pydantic config and the
run's arguments as they are, and hands its result back. Elastic restarts are not needed: a failed stage is rerun as a
task and `fit` resumes from its checkpoint. Only one machine is covered (`processes`
per node); multi-node training would need a rendezvous address instead of 127.0.0.1.
The fork server (not fork) keeps ranks clear of the launching process's threads
(Prefect's event loop) and CUDA state.

Inside a rank: `prepare_model` wraps the model in DistributedDataParallel (after
optionally turning BatchNorm layers into `CrossRankBatchNorm`), `mean_over_ranks` and
`average_over_ranks` all-reduce metrics, `barrier` waits for every rank, and `is_main`
guards writes (checkpoints, model.pt).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import timm.layers
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data import storage
from data.mixing import rank_seed as _rank_seed

HOST = "127.0.0.1"
TIMEOUT = timedelta(minutes=30)  # a collective (or rank 0 waiting on on_step) that takes longer fails
START_METHOD = "forkserver"
_POLL_S = 0.1


class RankError(Exception):
    """Base of the errors that `launch` raises as the failing rank raised them, without
    the rank's traceback (their message says what happened). They must pickle."""


class WorkerError(RuntimeError):
    """A training rank failed; `rank` is its index, `detail` its exception line, `trace` its traceback."""

    def __init__(self, rank: int, detail: str, trace: str = ""):
        self.rank, self.detail, self.trace = rank, detail, trace
        super().__init__(f"training process rank {rank} failed: {detail}" + (f"\n{trace}" if trace else ""))


# --------------------------------------------------------------------------- where am I


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and with one process): the rank that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """`seed` on rank 0, an unrelated seed on other ranks (augmentation and dropout noise)."""
    return _rank_seed(seed, rank())


def per_rank(total: int, processes: int, what: str = "batch_size") -> int:
    """`total // processes`; a ValueError naming both values when it does not divide evenly."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if total % processes:
        raise ValueError(
            f"{what}={total} is not divisible by processes={processes}: "
            f"each process draws {what}/processes samples of the global batch"
        )
    return total // processes


# --------------------------------------------------------------------------- reductions


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (one all-reduce); every rank passes the same keys."""
    n = world_size()
    if n == 1 or not values:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(values, (t / n).tolist()))


def average_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Detached mean of `t` over ranks, on `t`'s device (one all-reduce, on the backend's
    device; `t` itself, detached, with one process)."""
    n = world_size()
    t = t.detach()
    if n == 1:
        return t
    out = t.to(_collective_device(), copy=True)
    dist.all_reduce(out)
    return (out / n).to(t.device)


# --------------------------------------------------------------------------- BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (an all-reduce each way)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on the CPU: statistics summed over all ranks.

    torch's SyncBatchNorm refuses CPU inputs (and DDP refuses it on CPU modules), so
    here the statistics come from two differentiable all-reduces (sums and count, then
    the centred sum of squares). Their backward all-reduces the gradients, so the ranks
    together compute the gradient of the global batch's loss, as one process would.
    Optional `drop` and `act` children (timm's BatchNormAct2d) run after the
    normalization, in that order. In eval mode, or with one process, it is plain BatchNorm.
    Input [B, C, *] with at least 2 dimensions.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [B, C, ...], got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and world_size() > 1:
            x_out = self._across_ranks(x)
        else:
            x_out = super().forward(x)
        for name in ("drop", "act"):
            if name in self._modules:
                x_out = self._modules[name](x_out)
        return x_out

    def _across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        total = _SumOverRanks.apply(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / c])]))
        count = total[c].detach()
        mean = total[:c] / count
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> int:
    """Make every BatchNorm layer under `model` normalize over the global batch, in place.

    CUDA: torch's SyncBatchNorm (timm's converter, which keeps BatchNormAct2d's
    activation). CPU: `CrossRankBatchNorm`. Returns the number of layers converted.
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise TypeError("sync_batchnorm needs a model that contains BatchNorm layers, not a BatchNorm layer")
    if device.type != "cuda":
        return convert_batchnorm(model)
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    timm.layers.convert_sync_batchnorm(model)  # replaces children in place when the root is no BatchNorm
    return count


def convert_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm layer under `model` by a `CrossRankBatchNorm`, in place.

    Parameters and buffers are moved over (the state dict keeps its keys); timm's
    BatchNormAct2d keeps its `drop`/`act` children. Returns the number of layers replaced.
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise TypeError("convert_batchnorm needs a model that contains BatchNorm layers, not a BatchNorm layer")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm) or isinstance(child, CrossRankBatchNorm):
                continue
            extra = set(child._modules) - {"drop", "act"}
            if extra:
                raise TypeError(f"cannot synchronize {type(child).__name__} at {name!r}: unknown children {extra}")
            new = CrossRankBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            for sub, module in child.named_children():
                new.add_module(sub, module)
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced


class _Replicated(DistributedDataParallel):
    """DDP whose unknown attributes (a family's `model.loss`, `model.postprocess`) are the module's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def prepare_model(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """The module to train: `model` itself with one process, else a DDP replica of it.

    Call after the model is on `device` and its checkpoint is loaded; save and load
    `model` (not the replica), so checkpoints carry no "module." prefix and fit any
    number of processes. DDP broadcasts rank 0's weights and averages gradients.
    """
    if world_size() == 1:
        return model
    if sync_bn:
        sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return _Replicated(model, device_ids=ids, gradient_as_bucket_view=True)


# --------------------------------------------------------------------------- launching


def resolve_backend(backend: str, device: torch.device) -> str:
    match backend:
        case "auto":
            return "nccl" if device.type == "cuda" else "gloo"
        case "nccl" if device.type != "cuda":
            raise ValueError(f"dist_backend='nccl' needs a CUDA device, got device={str(device)!r}; use gloo")
        case "nccl" | "gloo":
            return backend
    raise ValueError(f"unknown dist_backend {backend!r}; valid: auto, gloo, nccl")


def _rank_device(device: torch.device, r: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + r)
    return device


def _run_rank(r, fn, args, world, port, backend, device, threads, events, replies, want_steps, reports, env):
    """Body of rank `r` (a fork-server child): join the group, run fn, hand back rank 0's result.
    `env`: the launcher's storage settings (the fork server's environment may predate them)."""
    try:
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world)
        )
        device = _rank_device(device, r)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(threads)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=TIMEOUT)
        dist.init_process_group(
            backend,
            store=store,
            rank=r,
            world_size=world,
            timeout=TIMEOUT,
            device_id=device if backend == "nccl" else None,
        )
        log, on_step = (lambda msg: None), None
        if r == 0:

            def log(msg: str) -> None:
                events.put(("log", msg))

            if want_steps:

                def on_step(step: int, logs: dict[str, float]) -> None:
                    events.put(("step", step, logs))
                    replies.get(timeout=TIMEOUT.total_seconds())  # the hook ran in the launcher

        result = fn(*args, device=device, log=log, on_step=on_step)
        if r == 0:
            events.put(("result", result))
    except Exception as exc:
        if isinstance(exc, RankError):
            Path(reports, f"rank-{r}.pickle").write_bytes(pickle.dumps(exc))
        # Stamped before this rank leaves the group, hence before its peers fail because of it.
        Path(reports, f"rank-{r}.txt").write_text(f"{time.time_ns()}\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_failure(reports: str) -> tuple[int, str] | None:
    """(rank, traceback) of the earliest failure report, if any."""
    found = []
    for path in Path(reports).glob("rank-*.txt"):
        stamp, _, trace = path.read_text().partition("\n")
        if stamp.isdigit() and trace:
            found.append((int(stamp), int(path.stem.removeprefix("rank-")), trace))
    return min(found)[1:] if found else None


def _rank_error(reports: str, rank: int) -> RankError | None:
    path = Path(reports, f"rank-{rank}.pickle")
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # none written, or it does not unpickle here: report the traceback instead
        return None


def _last_line(trace: str) -> str:
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _stop(context) -> None:
    for p in context.processes:
        if p.is_alive():
            p.terminate()
    for p in context.processes:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def launch(
    fn: Callable[..., Any],
    args: tuple,
    processes: int,
    device: str | torch.device,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Any:
    """Run `fn(*args, device=, log=, on_step=)` on `processes` ranks; return rank 0's result.

    fn must be a module-level function and args picklable when processes > 1. Raises
    WorkerError (naming the rank) if a rank fails (its RankError itself if it raised one),
    or whatever `log`/`on_step` raised.
    """
    device = torch.device(device)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return fn(*args, device=device, log=log, on_step=on_step)
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        need = (device.index or 0) + processes
        if torch.cuda.device_count() < need:
            raise ValueError(
                f"processes={processes} on device={str(device)!r} needs {need} GPUs, "
                f"this machine has {torch.cuda.device_count()}"
            )
    ctx = multiprocessing.get_context(START_METHOD)
    # Effective only if this process has not started its fork server yet.
    ctx.set_forkserver_preload(["torch", fn.__module__])
    events, replies = ctx.Queue(), ctx.Queue()
    reports = tempfile.mkdtemp(prefix="noisy-student-ranks-")
    store = dist.TCPStore(HOST, 0, world_size=None, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    threads = max(1, torch.get_num_threads() // processes)
    devices = "cpu" if device.type == "cpu" else f"{_rank_device(device, 0)}..{_rank_device(device, processes - 1)}"
    log(f"training on {processes} processes ({backend}, {devices})")
    context = torch_mp.start_processes(
        _run_rank,
        args=(
            fn,
            args,
            processes,
            store.port,
            backend,
            device,
            threads,
            events,
            replies,
            on_step is not None,
            reports,
            storage.settings(),
        ),
        nprocs=processes,
        join=False,
        start_method=START_METHOD,
    )
    results: list = []

    def handle(msg: tuple) -> None:
        match msg:
            case ("log", text):
                log(text)
            case ("step", step, logs):
                on_step(step, logs)
                replies.put("go")
            case ("result", value):
                results.append(value)

    def drain(only_logs: bool = False) -> None:
        while True:
            try:
                msg = events.get(timeout=_POLL_S)
            except queue.Empty:
                return
            if not only_logs or msg[0] == "log":
                handle(msg)

    try:
        while True:
            try:
                msg = events.get(timeout=_POLL_S)
            except queue.Empty:
                msg = None
            if msg is not None:
                handle(msg)
            if context.join(timeout=0):  # raises as soon as a rank has failed
                break
        drain()
    except torch_mp.ProcessRaisedException as err:
        drain(only_logs=True)
        rank_failed, trace = _first_failure(reports) or (err.error_index, err.msg)
        if (as_raised := _rank_error(reports, rank_failed)) is not None:
            raise as_raised from None
        raise WorkerError(rank_failed, _last_line(trace), trace.strip()) from None
    except torch_mp.ProcessExitedException as err:
        drain(only_logs=True)
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        raise WorkerError(err.error_index, f"process died ({how})") from None
    finally:
        _stop(context)
        shutil.rmtree(reports, ignore_errors=True)
        del store
    if not results:
        raise WorkerError(0, "finished without returning a result")
    return results[0]
