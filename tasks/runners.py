"""Where labeling tasks run: the task runners `pseudo.runner` names, and what they need.

A bounded thread or process pool on this machine, or Dask (a scheduler's address or a
LocalCluster started for the flow run), with the settings that make task runs in
other processes report to the flow's API and the annotations that give each labeling
task one GPU on a CUDA run. Each worker of the pools and of the LocalCluster is bound
to one of the labeling devices (engine/devices.py). `labeling_runner` is all of it as
one context manager; flows/ calls only that.
"""

from __future__ import annotations

import itertools
import multiprocessing
from contextlib import contextmanager, nullcontext

from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from configs import PseudoLabelConfig
from engine.devices import bind_next_process, bind_thread, labeling_devices, worker_device


def _uses_gpu(device: str) -> bool:
    return device.split(":", 1)[0] == "cuda"


class DeviceThreadPool(ThreadPoolTaskRunner):
    """A thread pool whose worker threads are bound to `devices` in the order they start."""

    def __init__(self, max_workers: int, devices: list[str] | tuple[str, ...]):
        super().__init__(max_workers=max_workers)
        self.devices = tuple(devices)
        self._threads_started = itertools.count()

    def duplicate(self) -> DeviceThreadPool:
        return type(self)(self._max_workers, self.devices)

    def __enter__(self):
        self._threads_started = itertools.count()
        return super().__enter__()

    def _register_worker_thread(self) -> None:
        """The executor's initializer, run in each new worker thread before its first task
        (Prefect's own hook, of the version pyproject.toml pins)."""
        super()._register_worker_thread()
        bind_thread(worker_device(self.devices, next(self._threads_started)))


def local_cluster_kwargs(rule: PseudoLabelConfig, device: str) -> dict:
    """The LocalCluster the Dask runner starts when no scheduler address is given:
    `max_workers` single-threaded worker processes, each bound to a labeling device
    (`BindLabelingDevice`); on a CUDA device each offers one "GPU" resource, which every
    labeling task asks for (`dask_annotations`). Like the scheduler and workers, the
    dashboards (HTTP, no authentication) listen on loopback only: distributed's default
    binds them to every interface."""
    from engine.dask_devices import BindLabelingDevice

    kwargs = {
        "n_workers": rule.max_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": "127.0.0.1:0",
        "worker_dashboard_address": "127.0.0.1:0",
        "plugins": (BindLabelingDevice(labeling_devices(rule, device)),),
    }
    if _uses_gpu(device):
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def dask_annotations(rule: PseudoLabelConfig, device: str) -> dict:
    """Dask annotations of the labeling tasks: on a CUDA device each asks for one "GPU"
    resource, so only workers started with one (`dask worker ADDRESS --nthreads 1
    --resources GPU=1`, one per GPU with its CUDA_VISIBLE_DEVICES) run them, one at a
    time per GPU. prefect-dask's `submit` passes the annotations of `dask.annotate`
    through to the scheduler (distributed merges them in `Client.submit`)."""
    if rule.runner == "dask" and _uses_gpu(device):
        return {"resources": {"GPU": 1}}
    return {}


def task_runner(rule: PseudoLabelConfig, device: str = "cpu"):
    """The task runner `rule.runner` names: a bounded thread or process pool on this
    machine, or Dask (the scheduler at `rule.dask_address`, else a LocalCluster started
    for the flow run and closed after it)."""
    match rule.runner:
        case "thread":
            return DeviceThreadPool(rule.max_workers, labeling_devices(rule, device))
        case "process":
            started = multiprocessing.get_context("spawn").Value("i", 0)  # the pool spawns its processes
            return ProcessPoolTaskRunner(
                max_workers=rule.max_workers,
                initializer=bind_next_process,
                initargs=(tuple(labeling_devices(rule, device)), started),
            )
        case "dask":
            from prefect_dask import DaskTaskRunner

            if rule.dask_address:
                return DaskTaskRunner(address=rule.dask_address)
            return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(rule, device))
    raise ValueError(f"unknown runner {rule.runner!r}; valid: thread, process, dask")


def flow_api(rule: PseudoLabelConfig, logger):
    """Settings under which task runs in other processes report to this flow's API.

    With no PREFECT_API_URL the flow runs on Prefect's temporary local server, and a
    pool process or Dask worker, knowing no address, would start a server of its own
    (tens of seconds each) and record its task runs there, out of the flow's sight.
    The settings travel with each submitted task, so naming the flow's server in them
    is enough. That server listens on 127.0.0.1 only: workers on other hosts need a
    real server (PREFECT_API_URL).
    """
    if rule.runner == "thread" or PREFECT_API_URL.value():
        return nullcontext()
    url = str(FlowRunContext.get().client.api_url)
    if rule.runner == "dask" and rule.dask_address:
        logger.warning(
            "no PREFECT_API_URL: the flow runs on a temporary server at %s, which Dask workers on other "
            "hosts cannot reach; set PREFECT_API_URL to a Prefect server they can reach",
            url,
        )
    return temporary_settings({PREFECT_API_URL: url})


def annotated(annotations: dict):
    if not annotations:
        return nullcontext()
    import dask

    return dask.annotate(**annotations)


@contextmanager
def started(runner, rule: PseudoLabelConfig, device: str, logger):
    """Enter `runner`; a Dask runner connects at once, so an unreachable scheduler fails
    here with its address instead of at the first task."""
    with runner:
        if rule.runner == "dask":
            try:
                client = runner.client
            except OSError as err:
                if not rule.dask_address:
                    raise
                raise ConnectionError(
                    f"cannot reach the Dask scheduler at {rule.dask_address!r} (pseudo.dask_address): {err}"
                ) from err
            need = dask_annotations(rule, device).get("resources", {})
            offers = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()] if need else []
            if need and not any(all(o.get(r, 0) >= n for r, n in need.items()) for o in offers):
                logger.warning(
                    "no worker of the Dask scheduler at %s offers the resources %s yet; the labeling tasks "
                    "wait for one (start workers with `dask worker ADDRESS --nthreads 1 --resources GPU=1`)",
                    rule.dask_address,
                    need,
                )
        yield runner


def log_devices(rule: PseudoLabelConfig, device: str, logger) -> None:
    """Say where labeling runs, and warn of listed devices that no worker is bound to."""
    if rule.runner == "dask" and rule.dask_address:
        if rule.devices:
            logger.warning(
                "pseudo.devices=%s is not used: the workers of the Dask scheduler at %s label on the device "
                "they were started with",
                list(rule.devices),
                rule.dask_address,
            )
        return
    listed = labeling_devices(rule, device)
    bound = [worker_device(listed, i) for i in range(rule.max_workers)]
    logger.info("labeling on %d worker(s) bound to %s", rule.max_workers, bound)
    if idle := listed[rule.max_workers :]:
        logger.warning(
            "pseudo.max_workers=%d < %d labeling devices: %s get no worker (raise pseudo.max_workers)",
            rule.max_workers,
            len(listed),
            idle,
        )


@contextmanager
def labeling_runner(rule: PseudoLabelConfig, device: str, logger):
    """The started task runner of a labeling flow run, under the flow's API settings and
    the labeling tasks' Dask annotations; closed (its LocalCluster stopped) on exit."""
    log_devices(rule, device, logger)
    runner = task_runner(rule, device)
    with flow_api(rule, logger), started(runner, rule, device, logger), annotated(dask_annotations(rule, device)):
        yield runner
