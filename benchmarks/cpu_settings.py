"""A bare CPU training step under the run settings that change its speed, not its result.

    .venv/bin/python benchmarks/cpu_settings.py [--batches 16 32] [--steps 4] [--repeats 3] \
        [--settings default tuned tuned+channels_last]

Settings: `default` (glibc's allocator settings, contiguous tensors), `tuned`
(`host_allocator: tuned`, engine/loop.py), `channels_last` (the model and its batches
in channels_last, `channels_last: true`), or both joined by `+`. Each (family, batch,
setting) case runs in a fresh interpreter (mallopt is process-wide), `--repeats` times,
the settings taking turns: a bare training step of the demo models at 128 px on random
tensors (as `train_step_time.py`), and the minor page faults it takes. Prints one JSON
object with every run, and per case the median seconds and faults per step of each
setting and its speed-up over the first setting.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = {"segmentation": ("nasfpn", 64, 3), "detection": ("fpn", 64, 1)}


SETTINGS = ("default", "tuned", "channels_last")


def one_case(family_name: str, n: int, setting: str, steps: int) -> dict:
    """Seconds and minor faults per bare step under `setting`, in this process."""
    import torch
    from train_step_time import batch, build, timed_steps

    from engine.loop import tune_host_allocator

    parts = set(setting.split("+"))
    tuned = tune_host_allocator() if "tuned" in parts else False
    family, model = build(family_name, *MODELS[family_name])
    if "channels_last" in parts:  # the batches follow the weights (nets/backbone.py)
        model.to(memory_format=torch.channels_last)
    faults = []
    seconds = timed_steps(
        family,
        model,
        batch(family_name, n),
        steps,
        on_start=lambda: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt),
    )
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults[0]) / steps
    return {"s_per_step": round(seconds, 3), "faults_per_step": round(per_step), "tuned": tuned}


def check_setting(setting: str) -> str:
    unknown = set(setting.split("+")) - set(SETTINGS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown setting {sorted(unknown)} in {setting!r}; valid: {', '.join(SETTINGS)}"
        )
    return setting


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=["segmentation", "detection"], choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 32])
    p.add_argument("--settings", nargs="+", type=check_setting, default=["default", "tuned", "tuned+channels_last"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", nargs=3, metavar=("FAMILY", "BATCH", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        family, n, setting = args.case
        print(json.dumps(one_case(family, int(n), check_setting(setting), args.steps)))
        return 0
    runs, cases = [], []
    for family in args.families:
        for n in args.batches:
            per = {s: [] for s in args.settings}
            for r in range(args.repeats):
                for setting in args.settings:
                    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--case", family, str(n), setting]
                    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                    row = {"family": family, "batch": n, "setting": setting, "repeat": r, **out}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    runs.append(row)
                    per[setting].append(out)
            med = {
                s: {k: statistics.median(o[k] for o in v) for k in ("s_per_step", "faults_per_step")}
                for s, v in per.items()
            }
            base = med[args.settings[0]]["s_per_step"]
            for m in med.values():
                m["speedup"] = round(base / m["s_per_step"], 2)
            cases.append({"family": family, "batch": n, **med})
    print(json.dumps({"benchmark": "cpu_settings", "steps": args.steps, "cases": cases, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
