"""Security: a shared Prefect server protected by PREFECT_SERVER_API_AUTH_STRING (docs/clusters.md,
A shared server needs a password) runs the project's flows for a client with PREFECT_API_AUTH_STRING and refuses
one without it (or with a wrong password); the labeling stage's Dask cluster listens on
loopback only. (tests/test_interrupt.py checks the temporary server and the training
processes of a run, and that a secret in the environment stays out of every file.)

A real `prefect server start` on a free loopback port with a fresh PREFECT_HOME; the
flow run is the evaluate stage of an untrained tiny detector on the small world.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from configs import PseudoLabelConfig, RunConfig, dump_config
from tests.conftest import tiny_model_config, world_data
from tests.test_interrupt import LOOPBACK, MARKER, listening, marked

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
AUTH = "noisy:student-shared-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-auth-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {**base, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = home / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "PREFECT_SERVER_API_AUTH_STRING": AUTH},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:  # /api/health answers without credentials
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        yield {"api": api, "env": {**env, "PREFECT_API_URL": api}}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(api: str, path: str, auth: str | None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(f"{api}{path}", data=b"{}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, None


def flow_runs(api: str) -> list[dict]:
    status, runs = post(api, "/flow_runs/filter", AUTH)
    assert status == 200
    return runs


@pytest.fixture(scope="module")
def evaluate_command(small_world, tmp_path_factory) -> list[str]:
    """`noisy-student stage evaluate` of an untrained tiny detector on the small world."""
    from engine.families import get_family
    from engine.training import save_model

    root = tmp_path_factory.mktemp("auth-run")
    data = world_data(small_world)
    cfg = RunConfig(out_dir=str(root / "run"), data=data, model=tiny_model_config(), eval_batch_size=8)
    model = save_model(root / "model.pt", cfg.family, cfg.model, get_family(cfg.family).build_model(cfg.model))
    config = root / "config.yaml"
    config.write_text(dump_config(cfg))
    return [str(BIN / "noisy-student"), "stage", "evaluate", str(config), "--checkpoint", str(model)]


def test_requests_without_the_password_are_refused(server):
    assert post(server["api"], "/flow_runs/filter", None)[0] == 401
    assert post(server["api"], "/flow_runs/filter", "noisy:wrong")[0] == 401
    assert post(server["api"], "/flow_runs/filter", AUTH)[0] == 200


def test_a_client_with_the_auth_string_runs_flows(server, evaluate_command):
    env = {**server["env"], "PREFECT_API_AUTH_STRING": AUTH}
    done = subprocess.run(evaluate_command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "AP" in json.loads(done.stdout[done.stdout.index("{") :])
    runs = [r for r in flow_runs(server["api"]) if r["name"] == "evaluate"]
    assert runs and all(r["state"]["type"] == "COMPLETED" for r in runs)


def test_a_client_without_it_is_refused_with_a_clear_error(server, evaluate_command):
    before = len(flow_runs(server["api"]))
    done = subprocess.run(evaluate_command, env=server["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "401 Unauthorized" in lines[-1] and "PREFECT_API_AUTH_STRING" in lines[-1], done.stderr[-3000:]
    assert len(flow_runs(server["api"])) == before


def test_labeling_cluster_listens_on_loopback_only(monkeypatch):
    """The LocalCluster of `pseudo.runner=dask`: scheduler, nanny, worker and their HTTP
    dashboards (distributed binds dashboards to every interface unless told otherwise)."""
    from distributed import LocalCluster

    from tasks.runners import local_cluster_kwargs

    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)  # the nanny and worker processes inherit it
    rule = PseudoLabelConfig(runner="dask", max_workers=1)
    with LocalCluster(**local_cluster_kwargs(rule, "cpu")) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        pids = [os.getpid(), *marked(marker)]
        assert len(pids) >= 2  # this process (scheduler and nanny), the worker
        sockets = listening(pids)
    assert len(sockets) >= 4, sockets
    assert all(s.startswith(LOOPBACK) for s in sockets), sockets
