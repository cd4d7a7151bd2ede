"""The worker plugin that binds each worker of the Dask runner's LocalCluster to a labeling
device (apart from engine/devices.py, so that only the Dask runner imports distributed)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from engine.devices import bind_process, worker_device


class BindLabelingDevice(WorkerPlugin):
    """Worker `i` of a LocalCluster (named 0..n-1, a restarted worker keeps its name) is
    bound to `worker_device(devices, i)` when it starts, before it runs a task."""

    name = "noisy-student-labeling-device"

    def __init__(self, devices: list[str] | tuple[str, ...]):
        self.devices = tuple(devices)

    def setup(self, worker) -> None:
        bind_process(worker_device(self.devices, int(worker.name)))
