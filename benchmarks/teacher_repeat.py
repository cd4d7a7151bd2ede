"""Does this machine train the demo's teacher bit for bit, and as other machines do?

Writes the demo's world for one seed, then runs the demo preset's teacher stage for a
few steps `--runs` times, each in a fresh process (`noisy-student stage teacher`), and
prints one JSON object: the machine, per run the sha256 of the trained weights and
whether the runs agree, and which recorded machine (if any) trained the same weights
(`same_as`; null unless the defaults below were run).
The digest is taken over the bytes of every tensor of `model.pt`'s state, in sorted
name order, so it changes with any bit of any weight.

    .venv/bin/python benchmarks/teacher_repeat.py [--seed 0] [--steps 60] [--runs 2] \
        [--family detection] [--quick] [--out runs/teacher-repeat]

Cost: the world (about half a minute) and a minute or two a run on a 2-core CPU. The
same seed and code have given demo figures a point of AP apart on different machines;
see docs/results.md, Repeatability across machines
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder when imported

from demo_seeds import machine  # noqa: E402

from configs import dump_config  # noqa: E402
from engine.rundir import RunDir  # noqa: E402
from engine.training import MODEL_FILE  # noqa: E402
from flows.demo import demo_config  # noqa: E402

# Digests measured with this script's defaults (detection demo, seed 0, 60 steps) at
# the code of their date; a change of the teacher's code or preset changes them too.
KNOWN = {
    "3af152835bf18061d3a3ee35456e1ffeed744992200eb7569c75b35491300639": "AMD EPYC, AVX2 kernels (2026-12-07)",
    "b6db799b5038aebfab0d4d0e53fb3c52d5cfc1974fa741d57e6678a6413aeb7b": "AMD EPYC, AVX512 kernels (2026-12-07)",
}


def weights_digest(checkpoint: str | Path) -> tuple[str, int]:
    """sha256 over the raw bytes of every tensor of the checkpoint's state, in sorted name
    order, and the number of tensors. Not the stage manifest's `digest` (engine.rundir.file_digest
    of model.pt): that also covers torch's file format and the model config, so equal
    weights saved by another torch version would not match."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(state[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), len(state)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60, help="teacher steps per run")
    p.add_argument("--runs", type=int, default=2, help="runs, each in a fresh process")
    p.add_argument("--family", default=None, help="demo family (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="the quick demo's world and preset (seconds a run)")
    p.add_argument("--out", default="runs/teacher-repeat")
    args = p.parse_args(argv)
    if args.runs < 1 or args.steps < 1:
        p.error(f"--runs and --steps must be at least 1 (got --runs {args.runs}, --steps {args.steps})")
    out = Path(args.out).resolve()
    cfg, _ = demo_config(out, args.seed, args.quick, family=args.family, overrides=[f"teacher.steps={args.steps}"])
    config = out / "config.yaml"
    config.write_text(dump_config(cfg))
    runs = []
    for i in range(args.runs):
        run_dir = out / f"run-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished stage would be skipped, not trained again
        cmd = [sys.executable, "-m", "flows.cli", "stage", "teacher", str(config), "--set", f"out_dir={run_dir}"]
        print(f"teacher_repeat: run {i + 1} of {args.runs}: {args.steps} steps", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        digest, tensors = weights_digest(RunDir(run_dir).stage(0, "teacher") / MODEL_FILE)
        runs.append({"run": i, "digest": digest, "tensors": tensors})
    digests = {r["digest"] for r in runs}
    # KNOWN holds digests of the defaults only; any other world, preset or length trains other weights
    defaults = not args.quick and args.seed == 0 and args.steps == 60 and cfg.family == "detection"
    result = {
        "benchmark": "teacher_repeat",
        "family": cfg.family,
        "seed": args.seed,
        "steps": args.steps,
        "quick": args.quick,
        "machine": machine(),
        "runs": runs,
        "repeats": len(digests) == 1,
        "same_as": sorted(KNOWN[d] for d in digests if d in KNOWN) if defaults else None,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
