"""The teacher stage's step against the bare step, in repeated alternating rounds.

    .venv/bin/python benchmarks/teacher_step_gap.py [--rounds 3] [--steps 10] [--warmup 3] \
        [--out runs/teacher-gap] [--quick]

`benchmarks/ratios.py` measures the teacher pair once (bare, stage, bare). This script
asks where a gap between them comes from, each variant once per round, the order
reversed every other round so that a machine drifting during the run favours none:

  bare_one     forward, loss, backward, clip, AdamW repeated on one ready batch (ratios.py's bare step)
  bare_many    the same on `--steps` different ready batches, in turn: what the batches'
               own content (boxes per image, augmentation) costs, without any loader
  stage        `training.train_teacher` as the demo preset runs it (`data.num_workers`
               loader processes doing S1 augmentation beside the step)
  stage_w0     the same with `data.num_workers=0`: loading and augmenting in the step's
               own process, in turn with the step, nothing competing for cores

All run in one process whose host allocator is tuned first as the stage tunes it. A
stage's seconds per step skip `--warmup` steps and its last step (which writes the
checkpoint). Prints one JSON object, also written to `<out>/teacher-step-gap.json`:
every variant's per-round seconds per step, their mean and range, and the ratios
bare_one / stage (the figure ratios.py reports), bare_many / stage, bare_one / bare_many
and bare_many / stage_w0, each with its range over the rounds. Cost: about 4 minutes on
a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ratios  # noqa: E402  (benchmarks/ratios.py: the same world, config and bare step)
import torch  # noqa: E402

VARIANTS = ("bare_one", "bare_many", "stage", "stage_w0")


def stage_step_s(cfg, out: Path, warmup: int) -> float:
    """Mean seconds per step of the teacher stage, skipping `warmup` steps and the last
    (`ratios.stage_step_s`)."""
    from engine import training

    seconds, _ = ratios.stage_step_s(
        lambda on_step: training.train_teacher(cfg, out, f"gap-{time.time()}", log=lambda m: None, on_step=on_step),
        warmup,
    )
    return seconds


def bare_many_s(cfg, batches: list[dict], loss, warmup: int) -> float:
    """Seconds per bare step over `batches` in turn (after `warmup` steps on the first ones)."""
    from engine.families import get_family
    from engine.loop import build_optimizer

    torch.manual_seed(0)
    model = get_family(cfg.family).build_model(cfg.model).train()
    if cfg.teacher.channels_last:  # as the stage lays the model out (its batches follow)
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.teacher)
    times = []
    for i, batch in enumerate(batches[:warmup] + batches):
        t0 = time.perf_counter()
        value = loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.teacher.grad_clip or float("inf"))
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="runs/teacher-gap")
    p.add_argument("--quick", action="store_true", help="the quick demo's toy model: checks the script, not the speed")
    args = p.parse_args(argv)

    from engine.families import get_family
    from engine.loop import device_settings
    from engine.training import augmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps + 2  # the last step writes the checkpoint and is not timed
    cfg = ratios.config(out, "detection", "cpu", total, 1, 8, args.quick)
    # The stage tunes the host allocator of its process (`run: host_allocator`) and a
    # process once tuned stays tuned: tune it first, so that every variant runs alike.
    device_settings(cfg.device, cfg.cudnn_benchmark, cfg.host_allocator)
    in_process = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0})})
    family = get_family(cfg.family)
    tcfg = cfg.teacher
    dataset = family.labeled_dataset(cfg.data, "train", augmentation(tcfg))
    n = tcfg.batch_size
    batches = [family.collate([dataset[(i * n + j) % len(dataset)] for j in range(n)]) for i in range(args.steps)]

    def loss(model, batch):
        return torch.stack(list(family.losses(model, batch).values())).sum(0).mean()

    run = {
        "bare_one": lambda: ratios.bare_step_s(cfg, tcfg, batches[0], loss, args.steps, args.warmup),
        "bare_many": lambda: bare_many_s(cfg, batches, loss, args.warmup),
        "stage": lambda: stage_step_s(cfg, out / "stage", args.warmup),
        "stage_w0": lambda: stage_step_s(in_process, out / "stage-w0", args.warmup),
    }
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            seconds[variant].append(run[variant]())
        print(json.dumps({"round": r, **{v: round(s[-1], 3) for v, s in seconds.items()}}), file=sys.stderr, flush=True)

    def ratio(a: str, b: str) -> dict:
        return spread([x / y for x, y in zip(seconds[a], seconds[b])])

    result = {
        "benchmark": "teacher_step_gap",
        "quick": args.quick,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch": n,
        "image_size": cfg.data.image_size,
        "num_workers": cfg.data.num_workers,
        "threads": torch.get_num_threads(),
        "seconds_per_step": {v: {"rounds": [round(x, 4) for x in s], **spread(s)} for v, s in seconds.items()},
        "ratios": {
            "bare_one / stage": ratio("bare_one", "stage"),
            "bare_many / stage": ratio("bare_many", "stage"),
            "bare_one / bare_many": ratio("bare_one", "bare_many"),
            "bare_many / stage_w0": ratio("bare_many", "stage_w0"),
        },
    }
    text = json.dumps(result, indent=1)
    (out / "teacher-step-gap.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
