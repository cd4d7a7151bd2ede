"""benchmarks/demo_seeds.py: a stopped benchmark leaves no demo running."""

import subprocess
import sys
import time

from tests.benchmark_module import load_benchmark

ds = load_benchmark("demo_seeds")

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
)


def test_stop_demos_ends_running_children_and_kills_those_that_ignore_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert stubborn.stdout.readline().strip() == "up"  # its handler is in place
    t0 = time.monotonic()
    ds.stop_demos([polite, stubborn, finished], grace_s=2.0)
    assert polite.returncode == -15  # SIGTERM
    assert stubborn.returncode == -9  # SIGKILL after the grace
    assert finished.returncode == 0
    assert time.monotonic() - t0 < 10
