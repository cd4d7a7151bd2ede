"""Inside a training rank with torch.distributed (docs/design.md, Distributed training). No Prefect here.

The ranks are started by engine/launcher.py (torch.distributed.elastic). With one
process no process group exists, `rank()` is 0, `world_size()` is 1, and every helper
below is the identity: the training code is the same functions for 1 and N processes.

Inside a rank: `prepare_model` wraps the model in DistributedDataParallel (after
optionally turning BatchNorm layers into `CrossRankBatchNorm`), `mean_over_ranks` and
`average_over_ranks` all-reduce metrics, `barrier` waits for every rank, and `is_main`
guards writes (checkpoints, model.pt).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import timm.layers
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.mixing import rank_seed as _rank_seed

TIMEOUT = timedelta(minutes=30)  # a collective (or rank 0 waiting on on_step) that takes longer fails


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
