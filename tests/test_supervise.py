"""The run's Ctrl-C handler stops its data loader workers before anything unwinds."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from data.mixing import loader_options
    from flows import supervise

    class Big(Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return torch.full((64, 64), float(i))

    if __name__ == "__main__":
        out = sys.argv[1]
        signal.signal(signal.SIGINT, supervise._on_interrupt)
        it = iter(DataLoader(Big(), batch_size=4, **loader_options(2)))
        next(it)
        workers = [w.pid for w in it._workers]
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            caught = False
        except KeyboardInterrupt:
            caught = True
        # Each worker is gone, or dying, or has SIGKILL pending (then it runs no more
        # code of its own): /proc/PID/status, State and the pending-signal masks.
        alive = []
        for pid in workers:
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
            except OSError:
                continue
            pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
            if status["State"].split()[0] not in "ZX" and not pending & (1 << (signal.SIGKILL - 1)):
                alive.append(pid)
        with open(out, "w") as f:
            json.dump({"caught": caught, "workers": workers, "alive": alive}, f)
    """
)


def test_interrupt_kills_loader_workers_before_unwinding(tmp_path: Path):
    out = tmp_path / "out.json"
    script = tmp_path / "interrupt.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The handler sent the script's own output to /dev/null: nothing is printed.
    assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["caught"], "SIGINT did not raise KeyboardInterrupt"
    assert len(result["workers"]) == 2
    assert result["alive"] == [], f"workers still running after the handler: {result['alive']}"


def test_descendants_finds_a_grandchild():
    from flows.supervise import _descendants

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print(p.pid, flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        grandchild = int(child.stdout.readline())
        assert set(_descendants([child.pid])) == {child.pid, grandchild}
    finally:
        for pid in _descendants([child.pid]):
            subprocess.run(["kill", "-9", str(pid)])
        child.wait()


def test_the_command_module_imports_nothing_heavy():
    """From the command line, flows.cli's module imports run before main() holds Ctrl-C
    back; a third-party import there (pydantic, torch, prefect) widens that window to
    most of a second on a slow machine, and a Ctrl-C in it prints a traceback."""
    probe = "import sys, flows.cli; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    ours = {"flows", "data", "configs", "engine", "nets", "detection", "segmentation", "tasks"}
    heavy = [m for m in loaded if m.split(".")[0] in {"pydantic", "torch", "prefect", "yaml", "numpy", "configs"}]
    assert heavy == [], heavy
    assert {"flows.cli", "flows.supervise"} <= set(loaded)
    assert {m.split(".")[0] for m in loaded} & ours <= {"flows", "data"}
