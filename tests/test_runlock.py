"""Two runs on one run directory: the second refuses at once, naming the holder; the lock
of a killed run is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import RunConfig, dump_config
from engine.runlock import LOCK_FILE, RunDirLocked, hold_run_dir, holds_run_dir
from flows.cli import main
from tests.conftest import tiny_model_config, world_data

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from engine.runlock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding <tmp>/run; yields (run dir, process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_run_refuses_at_once_naming_the_holder(holder):
    run, proc = holder
    t0 = time.monotonic()
    with pytest.raises(RunDirLocked) as err:
        with hold_run_dir(run):
            pytest.fail("the lock was taken twice")
    assert time.monotonic() - t0 < 1.0
    assert err.value.holder["pid"] == proc.pid and err.value.holder["host"] == socket.gethostname()
    assert f"pid {proc.pid} on host {socket.gethostname()}" in str(err.value)


def test_lock_of_a_killed_run_is_taken_over(holder, caplog):
    run, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the dead run's record stays
    with caplog.at_level(logging.WARNING, logger="noisy_student"):
        with hold_run_dir(run):
            assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {proc.pid}" in caplog.text
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over next time


def test_lock_is_reentrant_in_one_process_and_released_after_the_outermost(tmp_path):
    run = tmp_path / "run"

    @holds_run_dir
    def stage(cfg, x):
        return x + 1

    class Cfg:
        out_dir = str(run)

    with hold_run_dir(run):
        assert stage(Cfg(), 1) == 2
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run / LOCK_FILE).read_text() == ""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from engine.runlock import hold_run_dir\nwith hold_run_dir(sys.argv[1]): pass",
            str(run),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr


def test_cli_run_refuses_a_held_run_directory_before_any_stage(small_world, holder, tmp_path, capsys):
    run, proc = holder
    data = world_data(small_world)
    cfg = RunConfig(out_dir=str(run), data=data, model=tiny_model_config())
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    t0 = time.monotonic()
    assert main(["run", str(config)]) == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by another run (pid {proc.pid} on host" in err[0], err
    assert not (run / "round-0").exists()


@pytest.mark.parametrize("name", ["teacher_flow", "pseudo_label_flow", "student_flow", "noisy_student_flow"])
def test_stage_flows_hold_the_run_directory(holder, name):
    """Deployments and `serve` run the flows without the CLI: each flow holds the lock itself."""
    from flows import stages

    run, proc = holder

    class Cfg:
        out_dir = str(run)

    with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"):
        getattr(stages, name).fn(Cfg())


def test_prefect_validates_the_parameters_of_a_locked_flow(small_world, tmp_path):
    """The lock's wrapper keeps the flow's signature, its annotations resolved (Prefect would
    look the names up in the wrapper's module)."""
    from flows import stages

    data = world_data(small_world)
    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=data, model=tiny_model_config())
    params = stages.student_flow.validate_parameters({"cfg": cfg.model_dump(mode="json"), "round_index": "1"})
    assert isinstance(params["cfg"], RunConfig) and params["round_index"] == 1
