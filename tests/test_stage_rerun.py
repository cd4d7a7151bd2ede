"""Rerunning one stage with changed parameters redoes that stage and invalidates only the
stages after it: from the CLI (`noisy-student stage NAME CONFIG --set key=value`) and as
a custom run of the stage's deployment (`noisy-student serve`, then `run_deployment`).

The tests share one quick-demo run and run in file order; each first checks the state
it starts from, so any one of them also runs alone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import load_config
from engine.rundir import RunDir, finished, read_manifest
from flows import stages
from flows.cli import main
from flows.serve import run_parameters

STAGES = ("teacher", "pseudo", "student")


@pytest.fixture(scope="module")
def run(prefect_harness, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rerun")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out / "run"


def stamps(run: Path) -> dict[str, tuple[int, bytes]]:
    """Each stage's manifest: modification time and bytes."""
    out = {}
    for s in STAGES:
        m = run / "round-0" / s / "manifest.json"
        out[s] = (m.stat().st_mtime_ns, m.read_bytes())
    return out


def model_mtime(run: Path, stage: str) -> int:
    return (run / "round-0" / stage / "model.pt").stat().st_mtime_ns


def student_is_current(run: Path, overrides: list[str]) -> bool:
    """Whether the student's manifest matches what student_flow would compute now."""
    cfg = load_config(run / "config.yaml", overrides)
    teacher, pseudo = stages.teacher_outputs(cfg, 0), stages.pseudo_outputs(cfg, 0)
    return finished(RunDir(run).stage(0, "student"), stages.student_inputs(cfg, teacher, pseudo)) is not None


def stage(name: str, run: Path, overrides: list[str]) -> None:
    args = ["stage", name, str(run / "config.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0


def test_student_rerun_with_a_changed_parameter_redoes_only_the_student(run):
    assert student_is_current(run, [])
    before, model_before = stamps(run), model_mtime(run, "student")

    stage("student", run, ["student.alpha=2"])
    after = stamps(run)
    assert after["teacher"] == before["teacher"] and after["pseudo"] == before["pseudo"]
    assert after["student"] != before["student"]
    assert model_mtime(run, "student") != model_before  # retrained, not just relabelled
    assert read_manifest(run / "round-0/student")["inputs"]["student"]["alpha"] == 2.0
    assert student_is_current(run, ["student.alpha=2"]) and not student_is_current(run, [])

    stage("student", run, ["student.alpha=2"])  # same parameters again: skipped
    assert stamps(run) == after


def test_pseudo_rerun_with_a_new_threshold_invalidates_the_student(run):
    base = ["student.alpha=2"]
    stage("student", run, base)  # up to date after the test above (then a no-op)
    assert student_is_current(run, base)
    before, model_before = stamps(run), model_mtime(run, "student")

    changed = [*base, "pseudo.score_threshold=0.1"]
    stage("pseudo-label", run, changed)
    after = stamps(run)
    assert after["teacher"] == before["teacher"]
    assert after["pseudo"] != before["pseudo"]
    pseudo = read_manifest(run / "round-0/pseudo")
    assert pseudo["inputs"]["rule"]["score_threshold"] == 0.1
    # the student is left alone but no longer matches its inputs ...
    assert after["student"] == before["student"]
    assert not student_is_current(run, changed)

    # ... so the next student run retrains it. The parameters go the way a deployment
    # run's do: the config as JSON, validated into RunConfig by the flow.
    params = json.loads(json.dumps(run_parameters(str(run / "config.yaml"), changed, round_index=0)))
    out = stages.student_flow(**stages.student_flow.validate_parameters(params))
    retrained = stamps(run)
    assert retrained["teacher"] == before["teacher"] and retrained["pseudo"] == after["pseudo"]
    assert retrained["student"] != after["student"] and model_mtime(run, "student") != model_before
    assert read_manifest(run / "round-0/student")["inputs"]["pseudo"] == pseudo["outputs"]["digest"]
    assert out["checkpoint"] == str(run / "round-0/student/model.pt")
    assert student_is_current(run, changed)


def test_a_pseudo_stage_that_kept_nothing_stops_the_student_with_one_line(run, capsys):
    base = ["student.alpha=2", "pseudo.score_threshold=0.1"]  # where the test above left the run
    assert student_is_current(run, base)
    before = stamps(run)

    nothing = [base[0], "pseudo.score_threshold=1.0"]  # a sigmoid score never reaches 1
    stage("pseudo-label", run, nothing)
    assert read_manifest(run / "round-0/pseudo")["outputs"]["stats"]["kept"] == 0
    capsys.readouterr()
    args = ["stage", "student", str(run / "config.yaml")] + [a for o in nothing for a in ("--set", o)]
    assert main(args) == 1  # at once, not an endless wait for a pseudo batch
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("noisy-student: round 0: the teacher kept no unlabeled image"), err
    assert "pseudo.score_threshold=1.0" in err[-1]
    assert stamps(run)["student"] == before["student"]  # the old student is left as it was

    stage("pseudo-label", run, base)  # back where the next tests start
    assert student_is_current(run, base)


# ----------------------------------------------------------------------------- deployments


@pytest.fixture
def served(run, tmp_path):
    """`noisy-student serve --name rerun` against the test session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cli = Path(sys.executable).parent / "noisy-student"
    with open(log, "wb") as f:
        # another working directory: the served entrypoints are module paths
        proc = subprocess.Popen(
            [str(cli), "serve", "--name", "rerun"],
            cwd=tmp_path,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while True:
                assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
                try:
                    client.read_deployment_by_name("student/rerun")
                    client.read_deployment_by_name("pseudo-label/rerun")
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, f"deployments not served in time:\n{log.read_text()}"
                    time.sleep(1)
        yield log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the runner and the flow runs it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_custom_runs_of_the_served_deployments_redo_one_stage(run, served):
    from prefect.deployments import run_deployment

    def custom_run(deployment: str, overrides: list[str]):
        params = run_parameters(str(run / "config.yaml"), overrides, round_index=0)
        flow_run = run_deployment(deployment, parameters=params, timeout=900)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{served.read_text()[-4000:]}"

    base = ["student.alpha=2", "pseudo.score_threshold=0.1"]  # where the tests above left the run
    stage("pseudo-label", run, base)
    stage("student", run, base)
    before = stamps(run)

    changed = [*base[:1], "pseudo.score_threshold=0.07"]
    custom_run("pseudo-label/rerun", changed)
    after_pseudo = stamps(run)
    assert after_pseudo["teacher"] == before["teacher"]
    assert after_pseudo["pseudo"] != before["pseudo"]
    assert read_manifest(run / "round-0/pseudo")["inputs"]["rule"]["score_threshold"] == 0.07
    assert after_pseudo["student"] == before["student"] and not student_is_current(run, changed)

    custom_run("student/rerun", changed)
    after_student = stamps(run)
    assert after_student["teacher"] == before["teacher"] and after_student["pseudo"] == after_pseudo["pseudo"]
    assert after_student["student"] != before["student"]
    assert student_is_current(run, changed)
