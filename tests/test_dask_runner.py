"""Pseudo-labeling through prefect-dask: the same sidecars as the thread pool, a running
scheduler's address from config, GPU resource annotations, a clear error for an
unreachable scheduler, a worker killed mid-shard."""

import json
import logging
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import dask
import pytest
from dask.utils import key_split
from distributed import LocalCluster, Scheduler, SchedulerPlugin, SpecCluster, Worker, get_worker
from prefect import flow, task

from configs import PseudoLabelConfig
from flows import stages
from tasks import runners
from tests.labeling_setup import labeling_config, with_out_dir


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    return labeling_config(tmp_path_factory.mktemp("dask-labeling"))


@pytest.fixture(scope="module")
def thread_run(prefect_harness, base_cfg, tmp_path_factory):
    cfg = with_out_dir(base_cfg, tmp_path_factory.mktemp("thread-run"), runner="thread")
    return stages.pseudo_label_flow(cfg, 0), Path(cfg.out_dir)


def sidecars(run_dir: Path) -> dict[str, bytes]:
    pseudo = run_dir / "round-0" / "pseudo"
    return {p.name: p.read_bytes() for p in sorted(pseudo.glob("labels-*")) if p.suffix in (".tar", ".json")}


def assert_same_labels(run: tuple[dict, Path], reference: tuple[dict, Path]) -> None:
    (out, run_dir), (ref_out, ref_dir) = run, reference
    assert out["stats"] == ref_out["stats"]
    assert out["digest"] == ref_out["digest"]
    got, want = sidecars(run_dir), sidecars(ref_dir)
    assert sorted(got) == sorted(want) == [f"labels-{i:06d}.{ext}" for i in range(3) for ext in ("json", "tar")]
    for name in want:  # tars are byte-identical (fixed headers); jsons hold the same stats
        if name.endswith(".tar"):
            assert got[name] == want[name], name
        else:
            assert json.loads(got[name]) == json.loads(want[name]), name


def test_reference_run_labels_boxes(thread_run):
    stats = thread_run[0]["stats"]
    assert stats["images"] == 48 and stats["kept"] > 0 and stats["labels"] > 0


def test_local_cluster_labels_like_the_thread_pool(thread_run, base_cfg, tmp_path):
    cfg = with_out_dir(base_cfg, tmp_path, runner="dask", max_workers=2)
    assert_same_labels((stages.pseudo_label_flow(cfg, 0), tmp_path), thread_run)


class FinishedTasks(SchedulerPlugin):
    """Counts the tasks a scheduler saw finish, by key prefix."""

    def __init__(self):
        self.counts = Counter()

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory":
            self.counts[key_split(key)] += 1


def test_scheduler_address_from_config(thread_run, base_cfg, tmp_path):
    # In-process workers start in a moment; the flow only sees the scheduler's address.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        finished = FinishedTasks()
        cluster.scheduler.add_plugin(finished)
        cfg = with_out_dir(base_cfg, tmp_path, runner="dask", dask_address=cluster.scheduler_address)
        out = stages.pseudo_label_flow(cfg, 0)
    assert finished.counts["label_shards"] == 3  # one task per shard (3 shards) ran on this scheduler
    assert_same_labels((out, tmp_path), thread_run)


def test_chunked_tasks_label_like_one_task_per_shard(thread_run, base_cfg, tmp_path):
    """Two shards per task on the thread pool: two task runs, the same sidecars."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cfg = with_out_dir(base_cfg, tmp_path, runner="thread", shards_per_task=2)
    state = stages.pseudo_label_flow(cfg, 0, return_state=True)
    assert_same_labels((state.result(), tmp_path), thread_run)
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        names = sorted(r.name for r in client.read_task_runs(flow_run_filter=flow_run))
    assert names == ["label-shards-000000-x2", "label-shards-000002-x1"]


def test_chunked_tasks_on_a_scheduler(thread_run, base_cfg, tmp_path):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        finished = FinishedTasks()
        cluster.scheduler.add_plugin(finished)
        cfg = with_out_dir(base_cfg, tmp_path, runner="dask", dask_address=cluster.scheduler_address, shards_per_task=3)
        out = stages.pseudo_label_flow(cfg, 0)
    assert finished.counts["label_shards"] == 1
    assert_same_labels((out, tmp_path), thread_run)


def test_default_chunks_keep_many_tasks_for_few_shards_and_few_for_many():
    from configs import PseudoLabelConfig

    assert PseudoLabelConfig(max_workers=2).chunk_size(3) == 1  # one task per shard
    assert PseudoLabelConfig(max_workers=2).chunk_size(10_000) == 100  # 100 tasks
    assert (
        PseudoLabelConfig(max_workers=8).chunk_size(1_282) == 11
    )  # 1,282 / 128 (16 per worker), rounded up: 117 tasks
    assert PseudoLabelConfig(max_workers=8, shards_per_task=40).chunk_size(1_282) == 40


def test_unreachable_scheduler_names_its_address(prefect_harness, base_cfg, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    cfg = with_out_dir(base_cfg, tmp_path, runner="dask", dask_address=address)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match=f"cannot reach the Dask scheduler at '{address}'"):
            stages.pseudo_label_flow(cfg, 0)
    assert not list((tmp_path / "round-0" / "pseudo").glob("labels-*"))


def test_labeling_on_cuda_asks_for_a_gpu_resource(base_cfg):
    dask_rule = base_cfg.pseudo.model_copy(update={"runner": "dask"})
    assert runners.dask_annotations(dask_rule, "cuda") == {"resources": {"GPU": 1}}
    assert runners.dask_annotations(dask_rule, "cuda:1") == {"resources": {"GPU": 1}}
    assert runners.dask_annotations(dask_rule, "cpu") == {}
    assert runners.dask_annotations(base_cfg.pseudo, "cuda") == {}  # thread pool: no Dask
    # a LocalCluster started for a CUDA run offers what the tasks ask for
    assert runners.local_cluster_kwargs(dask_rule, "cuda")["resources"] == {"GPU": 1}
    assert "resources" not in runners.local_cluster_kwargs(dask_rule, "cpu")
    kwargs = runners.local_cluster_kwargs(dask_rule.model_copy(update={"max_workers": 3}), "cpu")
    (binding,) = kwargs.pop("plugins")  # each worker bound to a labeling device (tests/test_labeling_devices.py)
    assert binding.devices == ("cpu",)
    assert kwargs == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": "127.0.0.1:0",
        "worker_dashboard_address": "127.0.0.1:0",
    }


@task
def worker_name(i: int) -> str:
    time.sleep(0.2)  # long enough that both workers get tasks when both may
    return get_worker().name


def test_prefect_dask_passes_resource_annotations(prefect_harness):
    """The annotations the flow wraps its submissions in reach the scheduler: annotated
    tasks run only on the worker that offers a GPU."""
    spec = {
        "cpu": {"cls": Worker, "options": {"nthreads": 1}},
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=spec, scheduler=scheduler) as cluster:
        rule = PseudoLabelConfig(runner="dask", dask_address=cluster.scheduler_address)

        @flow
        def names(annotated: bool) -> list[str]:
            runner = runners.task_runner(rule, "cuda")
            annotations = runners.dask_annotations(rule, "cuda") if annotated else {}
            with runner, runners.annotated(annotations):
                futures = [runner.submit(worker_name, parameters={"i": i}) for i in range(8)]
                return [f.result() for f in futures]

        assert set(names(annotated=True)) == {"gpu"}
        assert set(names(annotated=False)) == {"cpu", "gpu"}


def test_workers_report_to_the_flows_temporary_server(prefect_harness):
    """With no PREFECT_API_URL, the settings that travel with each task name the flow's
    own server, so a worker process does not start a server of its own."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rule = PseudoLabelConfig(runner="dask")

    @flow
    def settings_seen_by_tasks() -> tuple[str | None, str, str | None]:
        flow_api = str(FlowRunContext.get().client.api_url)
        with temporary_settings(restore_defaults={PREFECT_API_URL}):  # as on a temporary server
            before = PREFECT_API_URL.value()
            with runners.flow_api(rule, logging.getLogger(__name__)):
                return before, flow_api, PREFECT_API_URL.value()

    before, flow_api, during = settings_seen_by_tasks()
    assert not before and during == flow_api


@pytest.mark.parametrize("offered", [{}, {"GPU": 1}])
def test_a_cuda_run_warns_when_no_worker_offers_a_gpu(offered, caplog):
    logger = logging.getLogger("test_dask_runner")
    with LocalCluster(n_workers=1, processes=False, resources=offered, dashboard_address=":0") as cluster:
        rule = PseudoLabelConfig(runner="dask", dask_address=cluster.scheduler_address)
        runner = runners.task_runner(rule, "cuda")
        with caplog.at_level(logging.WARNING, logger="test_dask_runner"):
            with runners.started(runner, rule, "cuda", logger):
                pass
    warned = [r.getMessage() for r in caplog.records if "offers the resources" in r.getMessage()]
    assert bool(warned) == (not offered)
    if warned:
        assert cluster.scheduler_address in warned[0]


def die_in_the_next_sidecar() -> int:
    """Run in a Dask worker process: its next sidecar write is killed (SIGKILL) after
    the first record went to the temporary file. A restarted worker is a fresh process,
    without this patch. Returns the pid."""
    import engine.labeling as labeling

    write = labeling.write_shard

    def write_and_die(path, records):
        def first_then_die():
            for i, record in enumerate(records):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield record

        return write(path, first_then_die())

    labeling.write_shard = write_and_die
    return os.getpid()


@pytest.mark.slow  # a worker process starts twice: about 30 s
def test_a_worker_killed_mid_shard(thread_run, base_cfg, tmp_path):
    """The scheduler hands the killed worker's shard to the restarted worker, the run
    completes with the same sidecars as the thread pool, and the temporary file of the
    killed attempt is gone."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with cluster.get_client() as client:
            (doomed,) = client.run(die_in_the_next_sidecar).values()
            cfg = with_out_dir(base_cfg, tmp_path, runner="dask", dask_address=cluster.scheduler_address)
            out = stages.pseudo_label_flow(cfg, 0)
            (survivor,) = client.run(os.getpid).values()
    assert survivor != doomed  # the worker was killed and restarted
    assert_same_labels((out, tmp_path), thread_run)
    pseudo = tmp_path / "round-0" / "pseudo"
    assert sorted(p.name for p in pseudo.iterdir() if p.name.endswith(".tmp")) == []
