"""Start-up time of N training ranks: the product's launcher against torchrun.

    .venv/bin/python benchmarks/launch_startup.py [--processes 2] [--repeats 3]

Each case starts N CPU ranks (gloo) that import the training stack (engine.training),
join one process group, pass a barrier and return; it measures the wall time from
the call to the return:
- `launch_first`: engine.launcher.launch in a fresh process: its fork server starts
  and imports torch and the training module once, then forks the ranks.
- `launch_again`: the same process launching again (each later training stage of a
  flow): the fork server is up, so only the fork, the rendezvous and the group remain.
- `torchrun`: `python -m torch.distributed.run --standalone --nproc-per-node N`, a
  fresh process per call, whose ranks are fresh interpreters importing everything.

Prints one JSON object (seconds; lists hold the repeats) with the reference step
(benchmarks/train_step_time.py) measured just before. Cost: about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
from demo_seeds import measure_reference  # this folder is on sys.path (run as a script, or PYTHONPATH)

import engine.training  # noqa: F401 - every rank imports the training stack, as a stage's ranks do

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def ready(*, device, log, on_step) -> int:
    """A rank's whole work: the group is joined (by the launcher); pass one barrier."""
    dist.barrier()
    return dist.get_world_size()


def _worker() -> None:
    """A torchrun rank."""
    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


def _env() -> dict:
    # This folder on PYTHONPATH (not inserted at run time): the fork server imports
    # `launch_startup` (the ranks' module) once from there, as a stage's ranks' module.
    path = [str(ROOT), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def _launch_case(processes: int, repeats: int) -> dict:
    """In a fresh process: the first launch, then `repeats` more."""
    code = (
        "import json, time\n"
        "import launch_startup\n"
        "from engine.launcher import launch\n"
        "times = []\n"
        f"for _ in range({repeats + 1}):\n"
        "    t0 = time.perf_counter()\n"
        f"    assert launch(launch_startup.ready, (), {processes}, 'cpu', log=lambda m: None) == {processes}\n"
        "    times.append(time.perf_counter() - t0)\n"
        "print(json.dumps(times))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return {"launch_first": times[0], "launch_again": times[1:]}


def _torchrun(processes: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    t0 = time.perf_counter()
    out = subprocess.run([*cmd, str(HERE), "--worker"], capture_output=True, text=True, env=_env(), cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-step measurement")
    args = parser.parse_args()
    if args.worker:
        _worker()
        return 0
    report: dict = {"processes": args.processes}
    if not args.no_reference:
        report["reference_step_s"] = measure_reference()
    launch_first, launch_again = [], []
    for _ in range(args.repeats):
        case = _launch_case(args.processes, 1)
        launch_first.append(case["launch_first"])
        launch_again += case["launch_again"]
    report["launch_first"] = [round(t, 3) for t in launch_first]
    report["launch_again"] = [round(t, 3) for t in launch_again]
    report["torchrun"] = [round(_torchrun(args.processes), 3) for _ in range(args.repeats)]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
