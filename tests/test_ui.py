"""Acceptance: a real `prefect server` on loopback, the quick demo reporting to it, and the
Prefect UI in headless Chromium showing the runs and their artifacts.

The server gets a free port, a fresh PREFECT_HOME and PREFECT_SERVER_UI_API_URL (without
it the UI calls port 4200; docs/design.md, Deployments and the UI). Chromium is Debian's /usr/bin/chromium
driven by Playwright; `make test-slow` installs both. Screenshots are saved under
runs/test-ui/<test name>/, printed at the end of each test.

A second test deploys prefect.yaml into a process work pool with `prefect deploy --all`
and has a `prefect worker` execute a custom run of the evaluate deployment.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.serve import run_parameters

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
RUN_NAMES = ("noisy-student", "teacher", "audit-round-0", "pseudo-label-round-0", "student-round-0", "soup-round-0")
ARTIFACT_KEYS = (
    "metrics-table",
    "pseudo-stats-round-0",
    "labeling-progress-round-0",
    "pseudo-audit-round-0",
    "soup-round-0",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.log = home / "server.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env = {**base, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        # what the flows, the CLI and the worker use to reach the server
        self.client_env = {**self.env, "PREFECT_API_URL": self.api}

    def start(self, timeout: float = 180) -> None:
        env = {**self.env, "PREFECT_SERVER_UI_API_URL": self.api}
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            assert self.proc.poll() is None, f"prefect server exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no /api/health in {timeout} s:\n{self.log.read_text()}"
            time.sleep(1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=5) as r:
                return r.status == 200 and json.load(r) is True
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the services it started
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def post(self, path: str, body: dict | None = None) -> list | dict:
        req = urllib.request.Request(
            f"{self.api}{path}", data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def run(self, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        """A command reporting to this server; fails the test with its output if it fails."""
        p = subprocess.run(args, env=self.client_env, capture_output=True, text=True, timeout=timeout, **kw)
        assert p.returncode == 0, f"{' '.join(args)} -> {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        return p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("prefect-home"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def demo(server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ui-demo")
    # with a second soup ingredient: the soup's table is one of the artifacts shown
    server.run(
        str(BIN / "noisy-student"),
        "demo",
        "--quick",
        "--out",
        str(out),
        "--set",
        "soup.ingredients=[[student.alpha=0.5]]",
    )
    return out / "run"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test-slow` installs Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test-slow` installs the test extras")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    yield page
    page.close()


@pytest.fixture
def shots(request, capsys):
    """runs/test-ui/<test>/ (runs/ is git-ignored): kept after pytest rotates its temp folders."""
    folder = ROOT / "runs" / "test-ui" / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    with capsys.disabled():
        print(f"\nscreenshots: {folder}: {', '.join(sorted(p.name for p in folder.glob('*.png')))}")


def screenshot(page, path: Path) -> None:
    """Save a PNG and check it holds a rendered page, not a blank or single-colour one."""
    from PIL import Image

    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, f"{path} looks blank ({len(colours)} colours)"


def wait_for_texts(page, texts) -> None:
    for text in texts:
        page.get_by_text(text, exact=True).first.wait_for(state="visible")


def test_ui_shows_the_quick_demo_runs_and_artifacts(server, demo, page, shots):
    # what the server recorded
    runs = {r["name"]: r for r in server.post("/flow_runs/filter")}
    assert set(RUN_NAMES) <= set(runs), sorted(runs)
    assert all(runs[n]["state_type"] == "COMPLETED" for n in RUN_NAMES)
    artifacts = {a["key"]: a for a in server.post("/artifacts/filter") if a["key"]}
    assert set(ARTIFACT_KEYS) <= set(artifacts), sorted(artifacts)

    # what the UI shows of it
    page.goto(f"{server.url}/runs")
    wait_for_texts(page, RUN_NAMES)
    screenshot(page, shots / "runs.png")

    page.goto(f"{server.url}/artifacts")
    wait_for_texts(page, ARTIFACT_KEYS)
    screenshot(page, shots / "artifacts.png")

    page.goto(f"{server.url}/runs/flow-run/{runs['noisy-student']['id']}")
    page.get_by_text("Subflow Runs", exact=True).wait_for()
    page.get_by_text("Artifacts", exact=True).last.click()
    wait_for_texts(page, ["metrics-table"])
    screenshot(page, shots / "flow-run-artifacts.png")

    # the metrics table renders the numbers of summary.json
    (r0,) = json.loads((demo / "summary.json").read_text())["rounds"]
    page.goto(f"{server.url}/artifacts/artifact/{artifacts['metrics-table']['id']}")
    wait_for_texts(
        page, ["teacher AP", "student AP", f"{r0['teacher_metrics']['AP']:.2f}", f"{r0['student_metrics']['AP']:.2f}"]
    )
    screenshot(page, shots / "metrics-table.png")

    page.goto(f"{server.url}/artifacts/artifact/{artifacts['pseudo-stats-round-0']['id']}")
    wait_for_texts(page, ["Pseudo-labels, round 0", "images labeled", str(r0["pseudo"]["images"])])
    screenshot(page, shots / "pseudo-stats.png")

    # the audit's pictures: markdown images with data: URIs, decoded and drawn by the browser
    page.goto(f"{server.url}/artifacts/artifact/{artifacts['pseudo-audit-round-0']['id']}")
    page.get_by_text("Pseudo-label audit, round 0", exact=True).wait_for()
    page.get_by_text("F1-maximizing threshold", exact=False).first.wait_for()
    for alt, min_width in (
        ("precision-recall per class", 600),
        ("held-out images with the kept labels of the teacher", 500),
    ):
        img = page.locator(f'img[alt="{alt}"]')
        img.wait_for(state="visible")
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle())
        assert img.evaluate("i => i.naturalWidth") >= min_width, alt
    screenshot(page, shots / "audit.png")

    # the soup's table: every ingredient and both soups
    soup = json.loads((demo / "round-0/soup/soup.json").read_text())
    page.goto(f"{server.url}/artifacts/artifact/{artifacts['soup-round-0']['id']}")
    wait_for_texts(page, ["uniform soup", "greedy soup", "student-1", f"{soup['soups']['greedy']['val']:.2f}"])
    screenshot(page, shots / "soup.png")


def test_deploy_all_to_a_process_pool_and_run_a_custom_evaluate(server, demo, page, shots):
    prefect = str(BIN / "prefect")
    server.run(prefect, "work-pool", "create", "noisy-student", "--type", "process")
    server.run(prefect, "--no-prompt", "deploy", "--all", cwd=ROOT)

    deployments = {f"{d['entrypoint'].rsplit(':', 1)[1]}": d for d in server.post("/deployments/filter")}
    assert set(deployments) >= {
        "noisy_student_flow",
        "teacher_flow",
        "pseudo_label_flow",
        "student_flow",
        "evaluate_flow",
    }
    for d in deployments.values():
        assert d["name"] == "cluster" and d["work_pool_name"] == "noisy-student"
        assert "cfg" in d["parameter_openapi_schema"]["required"]
    (nightly,) = deployments["noisy_student_flow"]["schedules"]
    assert nightly["active"] is False and nightly["schedule"]["cron"] == "0 2 * * *"

    # a custom run: the demo's config, evaluating the teacher instead of the student
    teacher = demo / "round-0/teacher"
    params = run_parameters(str(demo / "config.yaml"), [], checkpoint=str(teacher / "model.pt"))
    server.run(prefect, "deployment", "run", "evaluate/cluster", "--params", "-", input=json.dumps(params))
    server.run(prefect, "worker", "start", "--pool", "noisy-student", "--run-once", cwd=ROOT)

    (run,) = server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployments["evaluate_flow"]["id"]]}}})
    assert run["state_type"] == "COMPLETED", run["state"]
    (evaluation,) = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    rows = json.loads(evaluation["data"]) if isinstance(evaluation["data"], str) else evaluation["data"]
    ap = json.loads((teacher / "metrics.json").read_text())["AP"]
    assert {"metric": "AP", "value": f"{ap:.2f}"} in rows

    page.goto(f"{server.url}/deployments")
    wait_for_texts(page, ["noisy-student", "teacher", "pseudo-label", "student", "evaluate"])
    screenshot(page, shots / "deployments.png")
