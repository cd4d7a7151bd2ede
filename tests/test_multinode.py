"""Training on 2 nodes x 1 process: two elastic agents meet at a c10d rendezvous on 127.0.0.1.

The launching node is this test process (tasks/launcher.launch); the other node is a
`noisy-student agent` process. On one machine the two nodes still talk only through
the rendezvous store and the process group's TCP connections, as two hosts would.
"""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from configs import TrainConfig
from engine import distributed, launcher, training
from tests.test_distributed import crash_and_resume, curve, rel, teacher_config

ROOT = Path(__file__).resolve().parents[1]
AGENT_NODE = "NOISY_STUDENT_TEST_AGENT_NODE"  # set in the agent's environment only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def agent_node(endpoint: str, stages: int):
    """`noisy-student agent` for `stages` stages, as the second node; yields its process."""
    env = {**os.environ, AGENT_NODE: "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "agent", "--rdzv-endpoint", endpoint, "--nodes", "2"]
    cmd += ["--local-addr", "127.0.0.1", "--stages", str(stages), "--idle", "120"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def agent_output(proc, timeout=120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


# --------------------------------------------------------------------------- fast


def test_config_refuses_several_nodes_without_an_endpoint_and_an_uneven_split():
    with pytest.raises(ValidationError, match="nodes=2 needs rdzv_endpoint"):
        TrainConfig(batch_size=4, nodes=2)
    with pytest.raises(ValidationError, match=r"batch_size=6 is not divisible by processes=2 x nodes=2"):
        TrainConfig(batch_size=6, processes=2, nodes=2, rdzv_endpoint="10.0.0.1:29400")
    assert TrainConfig(batch_size=8, processes=2, nodes=2, rdzv_endpoint="10.0.0.1:29400").nodes == 2


@pytest.mark.parametrize("bad", ["10.0.0.1", ":29400", "node0:port", "node0:70000"])
def test_a_bad_endpoint_is_named(bad):
    with pytest.raises(ValueError, match="rdzv_endpoint must be HOST:PORT"):
        launcher.parse_endpoint(bad)
    assert launcher.parse_endpoint("[::1]:29400") == ("::1", 29400)


def test_an_agent_refuses_a_bad_endpoint_or_node_count_with_one_line(capsys):
    from flows.cli import main

    assert main(["agent", "--rdzv-endpoint", "node0", "--nodes", "2"]) == 2
    assert "rdzv_endpoint must be HOST:PORT, got 'node0'" in capsys.readouterr().err
    assert main(["agent", "--rdzv-endpoint", "node0:29400", "--nodes", "1"]) == 2
    assert "nodes >= 2" in capsys.readouterr().err


def test_an_agent_with_no_launcher_stops_when_idle():
    lines = []
    t0 = time.monotonic()
    failed = launcher.serve_node(f"127.0.0.1:{free_port()}", 2, 1, "127.0.0.1", idle_s=1, log=lines.append)
    assert failed == 0
    assert "no stage came for 1 s" in lines[-1], lines
    assert time.monotonic() - t0 < 30


def test_a_stage_whose_other_nodes_never_come_says_how_to_start_them(monkeypatch):
    monkeypatch.setattr(launcher, "JOIN_TIMEOUT_S", 2)
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=rf"noisy-student agent --rdzv-endpoint {endpoint} --nodes 2"):
        launcher.launch(launcher_rank, (), 1, "cpu", log=lambda m: None, nodes=2, rdzv_endpoint=endpoint)


def launcher_rank(*, device, log, on_step):
    return distributed.world_size()


# --------------------------------------------------------------------------- two nodes (slow)


def fail_on_agent_node(*, device, log, on_step):
    if os.environ.get(AGENT_NODE):
        raise ValueError(f"boom on rank {distributed.rank()}")
    distributed.barrier()  # the launching node's rank waits here until its peer's failure ends it


@pytest.mark.slow
def test_two_nodes_follow_the_one_process_loss_curve(small_world, tmp_path):
    """Stopped by a hook after step 1 and resumed, like the 2-process runs of test_distributed."""
    one = crash_and_resume(teacher_config(small_world, 1), tmp_path / "one")
    endpoint = f"127.0.0.1:{free_port()}"
    with agent_node(endpoint, stages=2) as agent:
        two = crash_and_resume(teacher_config(small_world, 1, nodes=2, rdzv_endpoint=endpoint), tmp_path / "two")
        out = agent_output(agent)
    assert agent.returncode == 1  # the stopped stage counts as failed on the agent too
    assert "stage 1 failed" in out and "stage 2 finished" in out, out
    assert two["result"]["processes"] == 2 and two["result"]["resumed_from"] == 1
    assert two["step_after_crash"] == 1  # the hook stopped both nodes right after step 1
    assert all(rel(a, b) < 1e-3 for a, b in zip(curve(one), curve(two))), (curve(one), curve(two))
    assert any("training on 2 nodes x 1 processes" in m for m in two["logs_first"])
    _, model = training.load_model(two["dir"] / training.MODEL_FILE)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_a_rank_failing_on_the_other_node_is_named_here(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    with agent_node(endpoint, stages=1) as agent:
        with pytest.raises(distributed.WorkerError, match=r"rank \d failed: ValueError: boom on rank \d") as err:
            launcher.launch(fail_on_agent_node, (), 1, "cpu", log=lambda m: None, nodes=2, rdzv_endpoint=endpoint)
        out = agent_output(agent)
    assert f"boom on rank {err.value.rank}" in err.value.detail
    assert "fail_on_agent_node" in err.value.trace  # the other node's traceback, reported on this one
    assert f"stage 1 failed on rank {err.value.rank}" in out, out


@pytest.mark.slow
def test_a_prefect_run_trains_teacher_and_student_on_two_nodes(prefect_harness, tmp_path):
    """The quick demo with its training stages on 2 nodes (teacher, student and the
    control, which trains on the student's settings): the flow's tasks are the launching
    node's agents, `noisy-student agent` serves the other node."""
    import json

    from flows.cli import main

    endpoint = f"127.0.0.1:{free_port()}"
    sets = []
    for stage in ("teacher", "student.train"):
        sets += ["--set", f"{stage}.nodes=2", "--set", f"{stage}.rdzv_endpoint={endpoint}"]
    with agent_node(endpoint, stages=3) as agent:
        assert main(["demo", "--quick", "--out", str(tmp_path), *sets]) == 0
        out = agent_output(agent)
    assert agent.returncode == 0 and "stage 3 finished" in out, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"][0]["student_metrics"]
    for stage in ("teacher", "student", "control"):
        log = (tmp_path / "run" / "round-0" / stage / "train.log").read_text()
        assert f"training on 2 nodes x 1 processes (gloo, cpu), rendezvous at {endpoint}" in log, log
