"""Ctrl-C and SIGTERM: `noisy-student demo --quick` stopped mid-training exits within 10 s
with one clear line and leaves no process behind; the next run resumes.

Each run starts in its own process group, as a shell starts a foreground job, and the
signal goes to the whole group, as the terminal sends Ctrl-C. Every process of a run
carries a marker in its environment, so whatever it started is found in /proc
afterwards. The same runs check that everything listening is on loopback and that a
secret-looking environment variable ends up in no file of the run or of Prefect.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MARKER = "NOISY_STUDENT_TEST_RUN"
SECRET = f"secret-{uuid.uuid4().hex}"
STOP_WITHIN_S = 10


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def gone(marker: str, within: float = 3.0) -> list[int]:
    """The marked processes still alive `within` seconds from now (at once if none)."""
    deadline = time.monotonic() + within
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def listening(pids: list[int]) -> set[str]:
    """host:port of every TCP socket the processes listen on (IPv4 as dotted quads, IPv6 as hex)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # LISTEN
                addr, port = local.split(":")
                if len(addr) == 8:
                    addr = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                found.add(f"{addr}:{int(port, 16)}")
    return found


LOOPBACK = ("127.", "00000000000000000000000001000000")  # 127.0.0.0/8, ::1


class Demo:
    """`noisy-student demo --quick --out OUT` in a process group of its own."""

    def __init__(self, root: Path, marker: str):
        self.out, self.home, self.marker = root / "demo", root / "prefect-home", marker
        self.home.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env = {
            **base,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            MARKER: marker,
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
        self.cmd = [str(BIN / "noisy-student"), "demo", "--quick", "--out", str(self.out)]
        self.run_dir = self.out / "run"

    def start(self, log: Path) -> subprocess.Popen:
        self.log = log
        with open(log, "wb") as f:
            return subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, process_group=0)

    def training(self, proc: subprocess.Popen, stage: str, timeout: float = 900) -> None:
        """Wait until `stage` has logged its first training step."""
        log = self.run_dir / "round-0" / stage / "train.log"
        deadline = time.monotonic() + timeout
        while not (log.exists() and any(ln.startswith("step ") for ln in log.read_text().splitlines())):
            assert proc.poll() is None, f"the demo exited early ({proc.returncode}):\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage} did not start training in {timeout} s"
            time.sleep(0.2)

    def stop(self, proc: subprocess.Popen, sig: signal.Signals) -> dict:
        """Send `sig` to the run's group, wait up to 60 s, then kill whatever is left.

        Returns the seconds it took to exit, the marked processes still alive 3 s later
        and the run's output after the signal."""
        offset = self.log.stat().st_size
        t0 = time.monotonic()
        try:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - t0
            left = gone(self.marker)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in marked(self.marker):
                os.kill(pid, signal.SIGKILL)
        after = self.log.read_bytes()[offset:].decode(errors="replace")
        return {"rc": proc.returncode, "elapsed": elapsed, "left": left, "after": after}


def interrupt(demo: Demo, root: Path, sig: signal.Signals, stage: str) -> dict:
    """Start the demo, send `sig` to its group once `stage` trains, then rerun it to the end."""
    proc = demo.start(root / "interrupted.log")
    try:
        demo.training(proc, stage)
    except BaseException:
        demo.stop(proc, signal.SIGKILL)
        raise
    sockets = listening(marked(demo.marker))
    had_checkpoint = (demo.run_dir / "round-0" / stage / "checkpoint.pt").exists()
    stopped = demo.stop(proc, sig)
    teacher = demo.run_dir / "round-0" / "teacher" / "manifest.json"
    teacher_stamp = teacher.stat().st_mtime_ns if teacher.exists() else None
    rerun = subprocess.run(demo.cmd, env=demo.env, capture_output=True, text=True, timeout=1800)
    return {
        **stopped,
        "sockets": sockets,
        "had_checkpoint": had_checkpoint,
        "teacher_stamp": teacher_stamp,
        "rerun": rerun,
        "left_after_rerun": gone(demo.marker),
        "demo": demo,
        "stage": stage,
    }


@pytest.fixture(scope="module")
def sigint_in_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigint")
    return interrupt(Demo(root, uuid.uuid4().hex), root, signal.SIGINT, "student")


@pytest.fixture(scope="module")
def sigterm_in_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigterm")
    return interrupt(Demo(root, uuid.uuid4().hex), root, signal.SIGTERM, "teacher")


def check_stopped(r: dict, name: str) -> None:
    print(f"{name}: stopped in {r['elapsed']:.1f} s")
    assert r["elapsed"] < STOP_WITHIN_S, f"took {r['elapsed']:.1f} s; output after the signal:\n{r['after'][-3000:]}"
    lines = [ln for ln in r["after"].splitlines() if ln.strip()]
    assert len(lines) == 1, "expected one line after the signal, got:\n" + r["after"][-3000:]
    assert lines[0].startswith(f"noisy-student: interrupted ({name})") and "rerun" in lines[0], lines[0]
    assert r["rc"] == 128 + getattr(signal, name)
    assert r["left"] == [], f"processes left behind: {r['left']}"


def check_resumed(r: dict) -> None:
    rerun = r["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    run = r["demo"].run_dir
    assert (run / "summary.json").exists()
    if r["stage"] == "student":  # the teacher had finished: kept as it was
        assert (run / "round-0" / "teacher" / "manifest.json").stat().st_mtime_ns == r["teacher_stamp"]
    log = (run / "round-0" / r["stage"] / "train.log").read_text()
    if r["had_checkpoint"]:
        assert "resuming from" in log
    assert r["left_after_rerun"] == [], f"processes left behind after a full run: {r['left_after_rerun']}"


def test_sigint_in_student_stops_cleanly(sigint_in_student):
    check_stopped(sigint_in_student, "SIGINT")


def test_rerun_after_sigint_resumes(sigint_in_student):
    check_resumed(sigint_in_student)


def test_sigterm_in_teacher_stops_cleanly(sigterm_in_teacher):
    check_stopped(sigterm_in_teacher, "SIGTERM")


def test_rerun_after_sigterm_resumes(sigterm_in_teacher):
    check_resumed(sigterm_in_teacher)


@pytest.mark.parametrize("delay", [0.3, 1.5, 4.0])
def test_sigint_while_the_run_starts_stops_cleanly(tmp_path, delay):
    """Ctrl-C before the stages run (interpreter start, imports, world, temporary server)."""
    demo = Demo(tmp_path, uuid.uuid4().hex)
    proc = demo.start(tmp_path / "early.log")
    time.sleep(delay)
    check_stopped(demo.stop(proc, signal.SIGINT), "SIGINT")


def test_run_listens_on_loopback_only(sigint_in_student):
    """The temporary Prefect server and the training processes bind to loopback only."""
    sockets = sigint_in_student["sockets"]
    assert sockets, "nothing listening: the temporary server was not found"
    assert all(s.startswith(LOOPBACK) for s in sockets), sockets


def test_secrets_stay_out_of_the_run_and_of_prefect(sigint_in_student):
    """AWS_SECRET_ACCESS_KEY was set for both runs: its value is in no file of the run
    directory (logs, manifests, config, report) nor of PREFECT_HOME (the database that
    holds the flow runs' parameters, logs and artifacts)."""
    demo = sigint_in_student["demo"]
    files = [p for root in (demo.out, demo.home) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "train.log" for p in files) and any(p.suffix == ".db" for p in files)
    holding = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert holding == []
