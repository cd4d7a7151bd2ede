"""The product's core claim, measured: the student beats its same-budget control on the embedded world.

Runs the demo for several generator seeds (each in its own process; `--jobs N` runs
N at a time, `--threads T` gives each T torch threads) with its control on
(`control=true`: the student's recipe on human labels only) and prints one JSON object:
per seed the teacher, control and student metric, student minus control (what the
pseudo-labels add) and student minus teacher, the same three on the held-out split, the
images kept, the wall time and that time in reference steps; then the means. The
reference step (one bare B0 + FPN detector step, batch 16 at 128 px;
benchmarks/train_step_time.py, the median of three measurements) is measured just
before the first seed and just after the last: the demo's budget is 2,000 of them.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 [--family segmentation] \
        [--jobs 1] [--threads T] [--out runs/bench] [--set key=value ...]

Cost: about the demo's time per seed, one at a time. An interrupted invocation resumes:
seeds with a finished run and a recorded wall time (seed-N/wall.json, with the reference
steps measured before and after the invocation that ran it) are not run again, and their
time is converted with those reference steps.
Wall times of seeds run side by side are not the demo's time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flows.artifacts import round_figures


def measure_reference(repeats: int = 3) -> float:
    """Seconds of one bare reference step (benchmarks/train_step_time.py): the median of
    `repeats` measurements of 4 steps, each in a fresh process. One measurement alone
    ranged 0.35-0.47 s over half an hour of one machine (2026-12-04)."""
    script = Path(__file__).with_name("train_step_time.py")
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, str(script), "--reference"], capture_output=True, text=True, check=True)
        times.append(json.loads(out.stdout)["runs"][0]["s_per_step"])
    return statistics.median(times)


def machine() -> dict:
    """What the figures were measured on: the CPU and the kernels torch chose for it. The
    same seed and code give figures a point or two apart on machines whose kernels differ,
    and the same figures where they are the same; see
    docs/results.md, Repeatability across machines"""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def stop_demos(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM to each demo still running, SIGKILL to any left after `grace_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def seed_row(seed: int, summary: dict, wall: float, ref: float | None) -> dict:
    """One seed's figures from its run's summary.json: teacher, control, student, the two
    differences, the held-out figures, images kept, wall time and reference steps."""
    metric = summary["metric"]
    r = summary["rounds"][0]
    if "control_metrics" not in r:
        raise ValueError(f"seed {seed}: the run trained no control (control: false); its gain has nothing to beat")
    f = round_figures(r, metric)
    held = r.get("held_out", {})
    return {
        "seed": seed,
        f"teacher_{metric}": round(f["teacher"], 2),
        f"control_{metric}": round(f["control"], 2),
        f"student_{metric}": round(f["student"], 2),
        "over_control": round(f["student - control"], 2),
        "gain": round(f["student - teacher"], 2),
        "held_out": {k: round(v, 2) for k, v in held.items() if k != "split"},
        "pseudo_kept": r["pseudo"]["kept"],
        "pseudo_labels": r["pseudo"]["labels"],
        "wall_s": round(wall, 1),
        "reference_steps": round(wall / ref) if ref else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--family", default=None, help="demo family (default: the demo's)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-step measurements")
    args = parser.parse_args()
    reference = []
    if not args.no_reference:
        reference.append(measure_reference())
        print(json.dumps({"reference_step_s": reference[-1]}), file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    pending, running, walls, earlier_refs, finished_earlier = [], {}, {}, {}, set()
    for seed in args.seeds:
        # A seed finished by an earlier, interrupted invocation keeps its measured time,
        # converted to reference steps with the reference step measured in that invocation.
        done = Path(args.out) / f"seed-{seed}" / "wall.json"
        if done.exists() and (done.parent / "run" / "summary.json").exists():
            record = json.loads(done.read_text())
            walls[seed] = record["wall_s"]
            # the mean of the reference steps measured before and after that invocation's seeds
            refs = [record[k] for k in ("reference_step_s", "reference_step_after_s") if record.get(k)]
            if refs:
                earlier_refs[seed] = refs
            finished_earlier.add(seed)
            print(json.dumps({"seed": seed, "finished_earlier": str(done)}), file=sys.stderr, flush=True)
        else:
            pending.append(seed)
    # A stopped benchmark stops its demos: each is a `noisy-student` supervisor, which ends
    # its run within seconds of a SIGTERM (flows/supervise.py) and keeps finished stages.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                seed = pending.pop(0)
                out = Path(args.out) / f"seed-{seed}"
                cmd = [sys.executable, "-m", "flows.cli", "demo", "--seed", str(seed), "--out", str(out)]
                if args.family:
                    cmd += ["--family", args.family]
                for o in ["control=true", *args.overrides]:
                    cmd += ["--set", o]
                out.mkdir(parents=True, exist_ok=True)
                log = open(out / "demo.log", "w")
                # Runs side by side each get their own Prefect home (and temporary server).
                run_env = {**env, "PREFECT_HOME": str((out / "prefect-home").resolve())} if args.jobs > 1 else env
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env)
                running[seed] = (proc, time.perf_counter())
            time.sleep(1)
            for seed, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    if proc.returncode:
                        log = Path(args.out) / f"seed-{seed}" / "demo.log"
                        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {log}")
                    walls[seed] = time.perf_counter() - t0
                    wall = Path(args.out) / f"seed-{seed}" / "wall.json"
                    record = {
                        "wall_s": round(walls[seed], 1),
                        "jobs": args.jobs,
                        "reference_step_s": reference[0] if reference else None,
                    }
                    wall.write_text(json.dumps(record) + "\n")
                    del running[seed]
    finally:
        stop_demos([proc for proc, _ in running.values()])
    if not args.no_reference:
        reference.append(measure_reference())
        for seed in walls.keys() - finished_earlier:  # the seeds this invocation ran
            wall = Path(args.out) / f"seed-{seed}" / "wall.json"
            wall.write_text(json.dumps(json.loads(wall.read_text()) | {"reference_step_after_s": reference[-1]}) + "\n")
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        summary = json.loads((out / "run" / "summary.json").read_text())
        metric = summary["metric"]
        refs = earlier_refs.get(seed, reference)
        rows.append(seed_row(seed, summary, walls[seed], statistics.fmean(refs) if refs else None))
        # the reference steps that converted this seed's time: measured just before and after it
        rows[-1]["reference_step_s"] = [round(x, 3) for x in refs]
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gains = [r["gain"] for r in rows]
    over = [r["over_control"] for r in rows]
    print(
        json.dumps(
            {
                "benchmark": "demo_seeds",
                "metric": metric,
                "runs": rows,
                "mean_over_control": round(statistics.mean(over), 2),
                "min_over_control": min(over),
                "mean_gain": round(statistics.mean(gains), 2),
                "min_gain": min(gains),
                "mean_wall_s": round(statistics.mean(r["wall_s"] for r in rows), 1),
                # measured before the first and after the last seed; their mean converts wall times
                "reference_step_s": [round(x, 3) for x in reference],
                "mean_reference_steps": round(statistics.mean(r["reference_steps"] for r in rows))
                if all(r["reference_steps"] for r in rows)
                else None,
                "overrides": args.overrides,
                "jobs": args.jobs,
                "threads": args.threads,
                "machine": machine(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
