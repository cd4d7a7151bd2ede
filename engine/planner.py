"""How long a run will take: `noisy-student plan CONFIG --gpus N [--images M]`.

The plan works from measured throughputs of the config's own model, image size and
batches on its device:
- a ratios figure (`benchmarks/ratios.py`, `--figures FILE`): the teacher's and the
  student's images per second and the labeling pipeline's, measured through the stages
  themselves; used when its family, device, image size and batch sizes are the config's;
- otherwise a probe of about 30 seconds on this machine: a few training steps of the
  teacher and of the student on real labeled samples (forward, backward, optimizer; no
  data loading) and the teacher labeling a batch of images.

Assumptions (each a line of the printed plan):
- Training is data parallel over `--gpus` ranks: a step takes the probed time of one
  rank's share of the batch (batch / N) and the gradient all-reduce is free. Rounds
  and stages run one after the other.
- Labeling spreads the pool's shards over the devices that label (`labeling_devices`:
  those of `pseudo.devices` that workers are bound to, at most N) with no loss:
  images / (devices x images per second), plus the orchestration cost of
  each task (`TASK_OVERHEAD_S`: 81 ms on the thread pool, 187 ms on Dask, measured by
  benchmarks/dask_noop_labeling.py; the process pool is taken at the thread pool's cost).
- Evaluation runs at the labeling rate over the val split, on one device; a soup of n
  extra ingredients evaluates 2n + 2 times on its held-out split and twice on val
  (`soup_passes`).
- The unlabeled pool holds `--images` images, or the first shard's record count times
  the number of shards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from configs import RunConfig, TrainConfig
from data.shards import expand_urls, iter_shard
from engine import devices
from engine.families import get_family
from engine.loop import autocast, build_optimizer, device_settings
from engine.training import augmentation

# Wall seconds of orchestration per labeling task, (flow - bare) / tasks as measured by
# benchmarks/dask_noop_labeling.py (benchmarks/results/noop-labeling-10000.json, 2-core
# CPU, 2026-12-02); the process pool is taken at the thread pool's cost, not measured.
TASK_OVERHEAD_S = {"thread": 0.081, "process": 0.081, "dask": 0.187}
PROBE_S = 30.0


def pool_images(cfg: RunConfig) -> tuple[int, int]:
    """(shards, images) of the unlabeled pool: the first shard's records times the shards."""
    shards = expand_urls(cfg.data.unlabeled_shards)[: cfg.pseudo.shard_limit]
    if not shards:
        raise ValueError(f"data.unlabeled_shards={cfg.data.unlabeled_shards!r} matches no shard")
    return len(shards), len(shards) * sum(1 for _ in iter_shard(shards[0]))


def _samples(cfg: RunConfig, train: TrainConfig, n: int) -> list:
    dataset = get_family(cfg.family).labeled_dataset(cfg.data, "train", augmentation(train))
    return [dataset[i % len(dataset)] for i in range(n)]


def _step_seconds(cfg: RunConfig, train: TrainConfig, model_cfg, n: int, budget_s: float) -> float:
    """Mean seconds of a training step on `n` samples (after one warm-up step)."""
    family = get_family(cfg.family)
    device = torch.device(cfg.device)
    model = family.build_model(model_cfg).to(device).train()
    optimizer = build_optimizer(model, train)
    batch = family.collate(_samples(cfg, train, n))
    batch["num_human"] = n
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < 4 and (len(times) < 2 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        with autocast(device, train.amp):
            loss = torch.stack(list(family.losses(model, batch).values())).sum(0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / len(times[1:])


def _label_rate(cfg: RunConfig) -> float:
    """Images per second of the teacher labeling a batch (after one warm-up batch)."""
    family = get_family(cfg.family)
    device = torch.device(cfg.device)
    model = family.build_model(cfg.model).to(device).eval()
    n = cfg.pseudo.batch_size
    images = [s[0] for s in _samples(cfg, cfg.teacher, n)]
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        with autocast(device, cfg.pseudo.amp):
            family.label_images(model, images, cfg.data.image_size, cfg.pseudo)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates[-1]


def probe(cfg: RunConfig, gpus: int) -> dict:
    """Measured seconds per step (one rank's share of each batch) and labeling images/s."""
    device_settings(cfg.device, cfg.cudnn_benchmark, cfg.host_allocator)
    t0 = time.perf_counter()
    teacher = _step_seconds(cfg, cfg.teacher, cfg.model, max(1, cfg.teacher.batch_size // gpus), PROBE_S / 3)
    s = cfg.student
    n_student = max(1, (s.train.batch_size + s.pseudo_per_batch) // gpus)
    student = _step_seconds(cfg, s.train, cfg.student_model, n_student, PROBE_S / 3)
    label = _label_rate(cfg)
    return {
        "source": f"probe on {cfg.device} ({time.perf_counter() - t0:.0f} s)",
        "teacher_step_s": teacher,
        "student_step_s": student,
        "label_img_s": label,
    }


def from_figures(cfg: RunConfig, path: str | Path, gpus: int) -> dict | None:
    """Throughputs of a ratios figure whose sizes are the config's; None otherwise."""
    fig = json.loads(Path(path).read_text())
    sizes = fig.get("sizes", {})
    s = cfg.student
    want = {
        "image_size": cfg.data.image_size,
        "teacher_batch": cfg.teacher.batch_size,
        "student_batch": [s.train.batch_size, s.pseudo_per_batch],
        "label_batch": cfg.pseudo.batch_size,
    }
    device_kind = torch.device(cfg.device).type
    if fig.get("family") != cfg.family or fig.get("device", "").split(":")[0] != device_kind:
        return None
    if any(sizes.get(k) != v for k, v in want.items()):
        return None
    return {
        "source": f"{path} ({fig.get('family')}, {fig.get('device')})",
        # images per second over the whole batch on one device; one rank takes batch / gpus
        "teacher_step_s": cfg.teacher.batch_size / fig["teacher"]["img_s"] / gpus,
        "student_step_s": (s.train.batch_size + s.pseudo_per_batch) / fig["student"]["img_s"] / gpus,
        "label_img_s": fig["labeling"]["pipeline_img_s"],
    }


def labeling_devices(cfg: RunConfig, gpus: int) -> int:
    """How many devices label the pool at once on a machine of `gpus` devices: the
    distinct devices the labeling workers are bound to (`pseudo.devices`, by default
    every GPU of a `cuda` run), at most `gpus`; the workers of a Dask scheduler, one per
    device as they are started by hand, `gpus`. A CPU counts as one device: the probe
    measured its rate on all its cores."""
    rule = cfg.pseudo
    if rule.runner == "dask" and rule.dask_address:
        return gpus
    listed = devices.labeling_devices(rule, cfg.device, visible_gpus=gpus)
    return min(gpus, devices.physical_devices(listed, rule.max_workers))


def soup_passes(extra: int) -> tuple[int, int]:
    """(held-out, val) evaluation passes of `engine.soups.make_soups` for a soup of `extra`
    ingredients besides the student: each of the extra + 1 ingredients on held-out, the
    greedy soup's `extra` candidates on held-out, both soups on val and the uniform soup
    on held-out."""
    return 2 * extra + 2, 2


def plan(cfg: RunConfig, gpus: int, images: int | None = None, rates: dict | None = None) -> dict:
    """Stage and run wall times (seconds), shards per labeling device and Prefect tasks of `cfg`
    on `gpus` devices, from `rates` (`probe` or `from_figures`; probed when None)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    for name, train in (("teacher", cfg.teacher), ("student.train", cfg.student.train)):
        if train.batch_size % gpus:
            raise ValueError(f"{name}.batch_size={train.batch_size} is not divisible by --gpus {gpus}")
    rates = rates or probe(cfg, gpus)
    shards, pool = pool_images(cfg)
    pool = images if images is not None else pool
    val = len(get_family(cfg.family).labeled_dataset(cfg.data, "val", None))
    rounds = cfg.max_rounds if cfg.rounds == "auto" else cfg.rounds
    per_task = cfg.pseudo.chunk_size(shards)
    label_tasks = math.ceil(shards / per_task)
    overhead = TASK_OVERHEAD_S[cfg.pseudo.runner] * label_tasks
    evaluate = val / rates["label_img_s"]
    stages = {"teacher": cfg.teacher.steps * rates["teacher_step_s"] + evaluate}
    if cfg.audit.split is not None:  # labeling the audited images (their scoring and pictures are not counted)
        held = len(get_family(cfg.family).labeled_dataset(cfg.data, cfg.audit.split, None))
        stages["audit"] = min(cfg.audit.images, held) / rates["label_img_s"]
    labelers = labeling_devices(cfg, gpus)
    stages["pseudo-label"] = pool / (labelers * rates["label_img_s"]) + overhead
    stages["student"] = cfg.student.train.steps * rates["student_step_s"] + evaluate
    if cfg.control:
        # the student's steps on its human part alone, at the student step's cost per image
        human = cfg.student.train.batch_size / (cfg.student.train.batch_size + cfg.student.pseudo_per_batch)
        stages["control"] = cfg.student.train.steps * rates["student_step_s"] * human + evaluate
    if n := len(cfg.soup.ingredients):
        # each extra ingredient is a student of the same cost (the sweep's own steps and batches
        # are taken as the run's), then the soup stage's evaluations
        held = len(get_family(cfg.family).labeled_dataset(cfg.data, cfg.soup.split, None))
        held_passes, val_passes = soup_passes(n)
        stages["soup"] = n * stages["student"] + (held_passes * held + val_passes * val) / rates["label_img_s"]
    total = stages["teacher"] + rounds * sum(v for k, v in stages.items() if k != "teacher")
    return {
        "gpus": gpus,
        "rounds": rounds,
        "rates": rates,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "total_s": round(total, 1),
        "labeling_devices": labelers,
        "pool": {"shards": shards, "images": pool, "shards_per_device": math.ceil(shards / labelers)},
        # per round: the audit, the labeling tasks, the student's training and evaluation, the
        # control's, the soup ingredients' and the soup's; once: the teacher's
        "prefect_tasks": 2
        + rounds
        * ((cfg.audit.split is not None) + label_tasks + 2 + 2 * cfg.control + 2 * len(cfg.soup.ingredients) + bool(n)),
        "labeling_tasks_per_round": label_tasks,
    }


def format_plan(p: dict, config: str) -> str:
    r = p["rates"]
    lines = [
        f"plan for {config} on {p['gpus']} device(s), {p['rounds']} round(s)",
        f"  throughputs: {r['source']}: teacher step {r['teacher_step_s']:.3f} s, student step "
        f"{r['student_step_s']:.3f} s (one rank's share of the batch), labeling {r['label_img_s']:.1f} img/s",
    ]
    for stage, s in p["stages_s"].items():
        lines.append(f"  {stage:<13} {_hms(s):>10}" + ("  (per round)" if stage != "teacher" else ""))
    lines.append(f"  {'whole run':<13} {_hms(p['total_s']):>10}")
    pool = p["pool"]
    lines.append(
        f"  pool: {pool['images']} images in {pool['shards']} shards, labeled on {p['labeling_devices']} device(s), "
        f"{pool['shards_per_device']} shards per device; "
        f"{p['labeling_tasks_per_round']} labeling tasks per round, {p['prefect_tasks']} Prefect tasks in all"
    )
    lines.append(
        "  assumes: linear data-parallel scaling, no data-loading stalls, stages one after another (engine/planner.py)"
    )
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
