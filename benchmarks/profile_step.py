"""Where a demo training step's time goes: torch.profiler over teacher and student steps.

    .venv/bin/python benchmarks/profile_step.py [--family detection] [--steps 4] [--warmup 3] \
        [--workers 1] [--threads T] [--out runs/profile]

Runs the demo preset's teacher and student stages (`training.train_teacher`,
`training.train_student`) for `--warmup` + `--steps` steps on a small demo world and
profiles the last `--steps` of each with torch.profiler (CPU activities; CUDA too on a
GPU). Prints one JSON object: per stage the wall seconds per step, the milliseconds per
step of the engine's phases (`engine.loop.STEP_PHASES`, marked with record_function:
waiting for the next batch, forward and loss, backward, the guard's host sync, the
optimizer step), and the ten operators with the most self CPU time. Each
stage's Chrome trace is written to `<out>/<stage>-trace.json` (open it in
chrome://tracing or https://ui.perfetto.dev).

The pseudo-labels come from a randomly initialized teacher with the rule's threshold at 0
and at most 3 boxes per image, as in `benchmarks/ratios.py`. `--workers` and `--threads`
set `data.num_workers` and torch's intra-op threads, to compare loader workers against
compute threads on a small machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ratios  # noqa: E402  (benchmarks/ratios.py: the same world, config and pseudo-labels)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine.loop import STEP_PHASES  # noqa: E402


def phases(prof, steps: int) -> dict:
    """Milliseconds per step of the named phases, from the profiler's events."""
    totals = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages() if e.key in STEP_PHASES}
    return {k: round(totals.get(k, 0.0) / steps, 1) for k in STEP_PHASES}


def profiled_stage(train, warmup: int, steps: int, trace: Path) -> dict:
    """Profile steps warmup+1 .. warmup+steps of `train(on_step)`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, record_shapes=False)
    stamps = []

    def on_step(step, logs):
        stamps.append(time.perf_counter())
        if step == warmup:
            prof.__enter__()
        elif step == warmup + steps:
            prof.__exit__(None, None, None)

    train(on_step)
    wall = (stamps[warmup + steps - 1] - stamps[warmup - 1]) / steps
    prof.export_chrome_trace(str(trace))
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "wall_s_per_step": round(wall, 3),
        "ms_per_step": phases(prof, steps),
        "top_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 1) for e in top},
        "trace": str(trace),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="detection")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the quick demo's toy model (a check of the script)")
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine import training

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    n = args.warmup + args.steps + 1
    cfg = ratios.config(out, args.family, args.device, n, 2, 32, args.quick, extra)
    teacher = ratios.teacher_file(cfg, out)
    dense = cfg.pseudo.model_copy(update={"score_threshold": 0.0, "max_boxes": 3})
    _, pairs = ratios.label_pool(cfg, teacher, out / "labels", rule=dense)
    quiet = lambda m: None  # noqa: E731
    result = {
        "benchmark": "profile_step",
        "family": cfg.family,
        "threads": torch.get_num_threads(),
        "num_workers": cfg.data.num_workers,
        "teacher": profiled_stage(
            lambda on_step: training.train_teacher(cfg, out / "teacher", f"t{time.time()}", quiet, on_step),
            args.warmup,
            args.steps,
            out / "teacher-trace.json",
        ),
        "student": profiled_stage(
            lambda on_step: training.train_student(
                cfg, out / "student", f"s{time.time()}", pairs, teacher, quiet, on_step
            ),
            args.warmup,
            args.steps,
            out / "student-trace.json",
        ),
    }
    print(json.dumps(result, indent=2))
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
