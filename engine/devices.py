"""Which device each labeling worker uses: `pseudo.devices`, dealt to the workers in turn.

Every worker of the thread pool, the process pool or the Dask runner's LocalCluster is
bound to one device when it starts (`worker_device` of its start order or worker name)
and keeps one teacher there for all its tasks. Workers pull tasks from one queue, so
while shards remain no device idles as long as each has a worker. A worker bound to no
device (a Dask worker started by hand) labels on the run's `device`, which is the GPU
it was started with (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import threading

import torch

from configs import PseudoLabelConfig

_thread = threading.local()  # a thread pool's worker
_process: str | None = None  # a pool process or a Dask worker process


class DeviceError(RuntimeError):
    """A labeling worker's device cannot be used there (no such device, no driver)."""


def labeling_devices(rule: PseudoLabelConfig, device: str, visible_gpus: int | None = None) -> list[str]:
    """The devices labeling runs on: `rule.devices`, or by default every visible GPU
    (`cuda:0` .. `cuda:{visible_gpus - 1}`, counted here when None) when `device` is
    `cuda` without an index, else `[device]`."""
    if rule.devices:
        return list(rule.devices)
    if device == "cuda":
        n = torch.cuda.device_count() if visible_gpus is None else visible_gpus
        return [f"cuda:{i}" for i in range(n)] or [device]
    return [device]


def worker_device(devices: list[str] | tuple[str, ...], index: int) -> str:
    """The device of the `index`-th worker (0-based): round-robin over `devices`."""
    return devices[index % len(devices)]


def physical_devices(devices: list[str] | tuple[str, ...], workers: int) -> int:
    """How many distinct devices `workers` workers are bound to: a CPU counts once
    whatever its name ("cpu", "cpu:0"), "cuda" is "cuda:0"."""

    def physical(name: str) -> str:
        d = torch.device(name)
        return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"

    return len({physical(worker_device(devices, i)) for i in range(workers)})


def bind_thread(device: str) -> None:
    """Bind the calling thread (a thread pool's worker) to `device`."""
    _thread.device = device


def bind_process(device: str) -> None:
    """Bind the calling process (a pool process, a Dask worker) to `device`."""
    global _process
    _process = device


def bind_next_process(devices: tuple[str, ...], started) -> None:
    """A process pool's initializer: bind this process to the device of its start order,
    counted in `started` (a multiprocessing Value shared by the pool's processes)."""
    with started.get_lock():
        index = started.value
        started.value += 1
    bind_process(worker_device(devices, index))


def bound_device(default: str) -> str:
    """The device this worker is bound to, else `default` (the run's device)."""
    return getattr(_thread, "device", None) or _process or default


def check_device(device: str) -> None:
    """Raise DeviceError naming `device` where this worker cannot use it; on CUDA, make
    it the thread's current device, so nothing of this worker lands on another GPU."""
    try:
        torch.empty(0, device=device)
        d = torch.device(device)
        if d.type == "cuda" and d.index is not None:
            torch.cuda.set_device(d)
    except Exception as err:
        raise DeviceError(f"labeling device {device!r} cannot be used by this worker (pseudo.devices): {err}") from err
