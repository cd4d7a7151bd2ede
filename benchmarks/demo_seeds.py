"""The product's core claim, measured: the student beats the teacher on the embedded world.

Runs the demo for several generator seeds (each in its own process, one after the
other) and prints one JSON object: per seed the teacher and student metric, the
gain and the wall time, then the mean gain.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 [--out runs/bench] [--set key=value ...]

Cost: about the demo's time per seed (12 minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--family", default=None, help="demo family (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        cmd = [sys.executable, "-m", "flows.cli", "demo", "--seed", str(seed), "--out", str(out)]
        if args.family:
            cmd += ["--family", args.family]
        for o in args.overrides:
            cmd += ["--set", o]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "run" / "summary.json").read_text())
        metric = summary["metric"]
        r = summary["rounds"][0]
        t, s = r["teacher_metrics"][metric], r["student_metrics"][metric]
        rows.append(
            {"seed": seed, f"teacher_{metric}": round(t, 2), f"student_{metric}": round(s, 2),
             "gain": round(s - t, 2), "pseudo_kept": r["pseudo"]["kept"], "wall_s": round(wall, 1)}
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gains = [r["gain"] for r in rows]
    print(json.dumps({
        "benchmark": "demo_seeds",
        "metric": metric,
        "runs": rows,
        "mean_gain": round(statistics.mean(gains), 2),
        "min_gain": min(gains),
        "mean_wall_s": round(statistics.mean(r["wall_s"] for r in rows), 1),
        "overrides": args.overrides,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
