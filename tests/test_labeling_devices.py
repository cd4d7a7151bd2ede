"""Labeling workers bound to the devices of `pseudo.devices`, in turn: the assignment,
each task reporting its device, every listed device labeling, an unusable device named."""

import logging
import multiprocessing
import threading

import pytest
from prefect import flow

from configs import PseudoLabelConfig, load_config
from data.shards import expand_urls
from engine import devices
from engine.devices import DeviceError, labeling_devices, worker_device
from tasks import runners, units
from tests.labeling_setup import labeling_config, with_out_dir


@pytest.fixture(autouse=True)
def unbound(monkeypatch):
    """Each test starts with this thread and process bound to no device."""
    monkeypatch.setattr(devices, "_thread", threading.local())
    monkeypatch.setattr(devices, "_process", None)


def test_workers_are_dealt_the_devices_in_turn():
    assert [worker_device(["cuda:0", "cuda:1", "cuda:2"], i) for i in range(7)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2", "cuda:0"
    ]  # fmt: skip
    assert devices.physical_devices(["cuda:0", "cuda:1", "cuda:2"], workers=2) == 2
    assert devices.physical_devices(["cpu", "cpu:0"], workers=4) == 1
    assert devices.physical_devices(["cuda", "cuda:0", "cuda:1"], workers=4) == 2


def test_the_default_devices_are_every_visible_gpu_of_a_cuda_run():
    rule = PseudoLabelConfig()
    assert labeling_devices(rule, "cuda", visible_gpus=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert labeling_devices(rule, "cuda", visible_gpus=0) == ["cuda"]  # none seen here: the run's device
    assert labeling_devices(rule, "cuda:1", visible_gpus=3) == ["cuda:1"]  # a named GPU stays one
    assert labeling_devices(rule, "cpu") == ["cpu"]
    listed = PseudoLabelConfig(devices=("cuda:2", "cuda:3"))
    assert labeling_devices(listed, "cuda", visible_gpus=8) == ["cuda:2", "cuda:3"]


def test_devices_are_a_run_setting(tmp_path):
    cfg = load_config("demo-quick", ["pseudo.devices=[cuda:0, cuda:1]"])
    assert cfg.pseudo.devices == ("cuda:0", "cuda:1")
    assert cfg.pseudo.digest_view() == load_config("demo-quick").pseudo.digest_view()


def test_pool_processes_and_cluster_workers_bind_in_start_order():
    started = multiprocessing.get_context("spawn").Value("i", 0)
    bound = []
    for _ in range(3):
        devices.bind_next_process(("cuda:0", "cuda:1"), started)
        bound.append(devices.bound_device("cpu"))
    assert bound == ["cuda:0", "cuda:1", "cuda:0"]

    from engine.dask_devices import BindLabelingDevice

    class Worker:
        name = 3

    BindLabelingDevice(["cuda:0", "cuda:1", "cuda:2"]).setup(Worker())
    assert devices.bound_device("cpu") == "cuda:0"


def test_a_thread_bound_to_a_device_keeps_it_and_others_use_the_runs():
    devices.bind_thread("cuda:1")
    seen = []
    other = threading.Thread(target=lambda: seen.append(devices.bound_device("cpu")))
    other.start()
    other.join()
    assert devices.bound_device("cpu") == "cuda:1" and seen == ["cpu"]


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    return labeling_config(tmp_path_factory.mktemp("devices"))


def label_each_shard(cfg) -> list[dict]:
    """The labeling stage's submissions (one shard per task) through `labeling_runner`;
    every task's stats."""
    shards = expand_urls(cfg.data.unlabeled_shards)

    @flow
    def label() -> list[dict]:
        out_dir = f"{cfg.out_dir}/pseudo"
        with runners.labeling_runner(cfg.pseudo, cfg.device, logging.getLogger(__name__)) as runner:
            futures = [
                runner.submit(
                    units.label_shards,
                    parameters=dict(
                        cfg=cfg,
                        teacher_checkpoint=f"{cfg.out_dir}/round-0/teacher/model.pt",
                        shards=[shard],
                        indices=[i],
                        keys=[f"key-{i}"],
                        out_dir=out_dir,
                        num_classes=3,
                    ),
                )
                for i, shard in enumerate(shards)
            ]
            return [stats for f in futures for stats in f.result()]

    return label()


def test_every_listed_device_labels_and_each_task_names_its_own(prefect_harness, base_cfg, tmp_path):
    """Two threads bound to two names of this CPU: the three shards' tasks name the
    device they ran on, and both devices labeled."""
    cfg = with_out_dir(base_cfg, tmp_path, runner="thread", max_workers=2, devices=("cpu", "cpu:0"))
    stats = label_each_shard(cfg)
    assert len(stats) == 3 and all(s["images"] == 16 for s in stats)
    assert {s["device"] for s in stats} == {"cpu", "cpu:0"}


def test_a_worker_on_an_unusable_device_names_it(prefect_harness, base_cfg, tmp_path):
    from prefect.states import Failed

    cfg = with_out_dir(base_cfg, tmp_path, runner="thread", max_workers=1, devices=("cuda:7",))
    with pytest.raises(DeviceError, match=r"labeling device 'cuda:7' cannot be used by this worker"):
        label_each_shard(cfg)
    assert not list((tmp_path / "pseudo").glob("labels-*"))
    assert not units._worth_retrying(None, None, Failed(data=DeviceError("labeling device 'cuda:7'")))


def test_the_local_cluster_binds_each_worker_to_a_device():
    """The Dask runner's own LocalCluster, as it starts it: worker i on device i (in turn)."""
    from distributed import LocalCluster

    rule = PseudoLabelConfig(runner="dask", max_workers=3, devices=("cpu", "cpu:0"))
    with LocalCluster(**runners.local_cluster_kwargs(rule, "cpu")) as cluster, cluster.get_client() as client:
        bound = client.run(devices.bound_device, "unbound")
        names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
    assert {names[address]: device for address, device in bound.items()} == {0: "cpu", 1: "cpu:0", 2: "cpu"}


@pytest.mark.slow  # two pool processes start and load the teacher: about 30 s
def test_pool_processes_label_on_their_bound_device(prefect_harness, base_cfg, tmp_path):
    """The process pool's initializer binds each spawned process: every task names the
    listed device, not the run's ("cpu")."""
    cfg = with_out_dir(base_cfg, tmp_path, runner="process", max_workers=2, devices=("cpu:0",))
    stats = label_each_shard(cfg)
    assert len(stats) == 3 and {s["device"] for s in stats} == {"cpu:0"}


def test_each_device_keeps_one_teacher_and_a_new_file_replaces_it(tmp_path, monkeypatch):
    """Three devices keep three teachers (no reload per task), and a new teacher file
    replaces a device's teacher instead of piling up one per round."""
    import os

    from engine import training
    from engine.families import get_family
    from tests.conftest import tiny_model_config

    loads = []
    real = training.load_model
    monkeypatch.setattr(training, "load_model", lambda path, device: loads.append(device) or real(path, "cpu"))
    monkeypatch.setattr(training, "_TEACHERS", {})
    model = get_family("detection").build_model(tiny_model_config())
    path = training.save_model(tmp_path / "model.pt", "detection", tiny_model_config(), model)
    names = ["cpu", "cpu:0", "meta-like"]
    first = [training.shared_model(path, d) for d in names]
    again = [training.shared_model(path, d) for d in names * 2]
    assert loads == names and all(a is first[i % 3] for i, a in enumerate(again))
    os.utime(path, ns=(1, 1))  # the next round's teacher, written at the same path
    assert training.shared_model(path, "cpu") is not first[0] and loads == [*names, "cpu"]
    assert len(training._TEACHERS) == 3
