"""Each hot path against its bare limit, measured in one run: one JSON object.

    .venv/bin/python benchmarks/ratios.py [--family detection] [--device cpu] \
        [--steps 10] [--warmup 3] [--shards 8] [--per-shard 32] [--out runs/ratios] [--quick] \
        [--set key=value ...]

Every pair runs the demo preset's model at its image size and batch, on a world written
by the demo's generator (`flows.demo.demo_config`), in this one process (the memory pair
in fresh child processes). Each bare figure is the mean of a run before and a run after
its pipeline figure, so a machine that drifts during the run biases neither side.

  labeling  pipeline img/s: `engine.labeling.label_shard` over the pool's shards (read,
            decode, letterbox, teacher forward, labeling rule, encode, write), over bare
            img/s: the teacher's eval forward on one ready uint8 batch. Goal >= 0.9.
  teacher   the teacher stage's step (`training.train_teacher`: loader workers, S1
            augmentation, collate, loss, the engine's guard, checkpoints) over a bare step
            (forward, loss, backward, clip, AdamW) repeated on one ready batch. Goal >= 0.9.
  student   the student stage's step (`training.train_student`: human and pseudo loaders,
            the preset's augmentation level in the workers, mixing, normalized loss) over
            a bare step on one ready mixed batch with the same loss. Goal >= 0.85.
  memory    peak RSS while labeling `--shards` shards over the peak while labeling 2,
            each in a fresh process (sampled every 50 ms). Goal <= 1.1.
  training RSS: the student stage's RSS at its last step over its RSS after warm-up
            (flat: about 1.0).

Step times skip `--warmup` steps (loader start-up, allocator growth) and a stage's last
step, which writes its checkpoint. The labeling pair
runs the preset's rule with `--teacher` (a trained model.pt; default: a randomly
initialized teacher, which keeps almost nothing at 0.5, so its rule costs less than a
trained one's). The student's pseudo-labels come from a second, untimed pass with the
threshold at 0 and at most 3 boxes per image, as many as the demo's. Cost: about 3
minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GOALS = {"labeling": (">=", 0.9), "teacher": (">=", 0.9), "student": (">=", 0.85), "memory": ("<=", 1.1)}


def rss_mib() -> float:
    """Resident set size of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def device_peak_gib(device: str, reset: bool = False) -> float | None:
    """Peak memory allocated on a CUDA device since the last reset (GiB); None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(out: Path, family: str, device: str, steps: int, shards: int, per_shard: int, quick: bool = False, extra=()):
    from flows.demo import demo_config

    sizes = {"n_train": 64, "n_val": 8, "n_unlabeled": shards * per_shard, "per_shard": per_shard}
    overrides = [
        f"teacher.steps={steps}",
        f"student.train.steps={steps}",
        f"teacher.checkpoint_every={steps}",
        f"student.train.checkpoint_every={steps}",
        f"teacher.log_every={steps}",
        f"student.train.log_every={steps}",
        "student.init=scratch",
        *extra,
    ]
    cfg, _ = demo_config(
        out,
        seed=0,
        quick=quick,
        device=device,
        overrides=overrides,
        family=family,
        world_dir=out / "world",
        sizes=sizes,
    )
    return cfg


def teacher_file(cfg, out: Path, given: str | None = None) -> Path:
    """`given` (a trained teacher's model.pt), or a randomly initialized teacher's (seed 0)."""
    from engine.families import get_family
    from engine.training import save_model

    if given:
        return Path(given)
    path = out / "teacher-model.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_model(path, cfg.family, cfg.model, get_family(cfg.family).build_model(cfg.model))
    return path


def label_pool(
    cfg, teacher: Path, out_dir: Path, limit: int | None = None, rule=None
) -> tuple[float, list[tuple[str, str]]]:
    """Label the pool's shards (the first `limit`) with `rule` (default: the config's);
    (img/s, [(image shard, sidecar)])."""
    from data.shards import expand_urls
    from engine import labeling
    from engine.training import shared_model

    family, model = shared_model(teacher, cfg.device)
    shards = expand_urls(cfg.data.unlabeled_shards)[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = cfg.model.num_classes
    images, pairs = 0, []
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        tar, js = labeling.sidecar_paths(out_dir, i)
        for p in (tar, js):
            p.unlink(missing_ok=True)
        stats = labeling.label_shard(
            family, model, shard, tar, js, cfg.data.image_size, rule or cfg.pseudo, num_classes, key=f"ratios-{i}"
        )
        images += stats["images"]
        pairs.append((shard, str(tar)))
    return images / (time.perf_counter() - t0), pairs


@torch.inference_mode()
def bare_inference(cfg, teacher: Path, repeats: int) -> float:
    """img/s of the teacher's eval forward on one ready batch of pseudo.batch_size images."""
    from engine.training import shared_model
    from nets.backbone import model_input

    _, model = shared_model(teacher, cfg.device)
    s, b = cfg.data.image_size, cfg.pseudo.batch_size
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    model(model_input(images, model))  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(model_input(images, model))
    return b * repeats / (time.perf_counter() - t0)


def stage_step_s(train, warmup: int) -> tuple[float, list[float]]:
    """Mean seconds per step of a stage after `warmup` steps, leaving out its last step
    (which also writes the checkpoint, as no bare step does), and its RSS at each step."""
    stamps, rss = [], []

    def on_step(step, logs):
        stamps.append(time.perf_counter())
        rss.append(rss_mib())

    train(on_step)
    gaps = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 : -1])]
    return statistics.mean(gaps), rss


def bare_step_s(cfg, tcfg, batch: dict, step_loss, steps: int, warmup: int) -> float:
    """Seconds per bare step: forward, loss, backward, clip, AdamW on one ready batch, in the
    stage's memory format (`channels_last`)."""
    from engine.families import get_family
    from engine.loop import autocast, build_optimizer

    device = torch.device(cfg.device)
    torch.manual_seed(0)
    model = get_family(cfg.family).build_model(cfg.model).to(device).train()
    if tcfg.channels_last:  # as the stage's engine lays out the model (and its batches follow)
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tcfg)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast(device, tcfg.amp):
            loss = step_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def one_batch(family, cfg, dataset, n: int, pseudo=None, n_pseudo: int = 0) -> dict:
    """One collated (mixed) batch as the stage's loaders and mixing make it."""
    from data.mixing import mixed_batches

    human = iter([[dataset[i % len(dataset)] for i in range(n)]])
    extra = None
    if pseudo is not None:
        it = iter(pseudo)
        extra = iter([[next(it) for _ in range(n_pseudo)]])
    return next(mixed_batches(human, extra, family.collate))


def ratio(name: str, value: float) -> dict:
    op, goal = GOALS[name]
    met = value >= goal if op == ">=" else value <= goal
    return {"ratio": round(value, 3), "goal": f"{op} {goal}", "met": met}


def memory_child(args) -> int:
    """Label `--memory-child N` shards in this fresh process; print its peak RSS."""
    cfg = config(
        Path(args.out), args.family, args.device, args.steps, args.shards, args.per_shard, args.quick, args.overrides
    )
    teacher = teacher_file(cfg, Path(args.out), args.teacher)
    import threading

    samples, stop = [rss_mib()], threading.Event()

    def sample():
        while not stop.wait(0.05):
            samples.append(rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    label_pool(cfg, teacher, Path(args.out) / f"memory-{args.memory_child}", limit=args.memory_child)
    stop.set()
    thread.join()
    # The peak while labeling (every 50 ms), apart from the start-up before it.
    print(json.dumps({"shards": args.memory_child, "peak_rss_mib": max(samples), "before_mib": samples[0]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="detection")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="measured steps per training pair")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--out", default="runs/ratios")
    p.add_argument("--quick", action="store_true", help="the quick demo's toy model: checks the script, not the speed")
    p.add_argument("--teacher", default=None, help="a trained teacher's model.pt to label with (default: random init)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args)

    from engine import training
    from engine.families import get_family
    from engine.loop import LossNormalizer
    from engine.training import augmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.warmup + args.steps + 2  # the last step writes the checkpoint: not timed
    cfg = config(out, args.family, args.device, steps, args.shards, args.per_shard, args.quick, args.overrides)
    family = get_family(cfg.family)
    teacher = teacher_file(cfg, out, args.teacher)
    result: dict = {"benchmark": "ratios", "family": cfg.family, "device": cfg.device, "quick": args.quick}
    result["sizes"] = {
        "image_size": cfg.data.image_size,
        "teacher_batch": cfg.teacher.batch_size,
        "student_batch": [cfg.student.train.batch_size, cfg.student.pseudo_per_batch],
        "label_batch": cfg.pseudo.batch_size,
        "num_workers": cfg.data.num_workers,
        "threads": torch.get_num_threads(),
        "student_level": cfg.student.train.augment_level,
    }

    # Labeling: bare, pipeline, bare.
    repeats = max(2, args.shards * args.per_shard // cfg.pseudo.batch_size)
    bare = [bare_inference(cfg, teacher, repeats)]
    device_peak_gib(cfg.device, reset=True)
    pipeline, _ = label_pool(cfg, teacher, out / "labels-timed")
    label_peak = device_peak_gib(cfg.device)
    bare.append(bare_inference(cfg, teacher, repeats))
    result["labeling"] = {
        "pipeline_img_s": round(pipeline, 1),
        "bare_img_s": [round(b, 1) for b in bare],
        "device_peak_gib": label_peak,
    }
    result["labeling"].update(ratio("labeling", pipeline / statistics.mean(bare)))

    # The student's pseudo-labels (not timed): a randomly initialized teacher keeps nothing
    # at the rule's threshold, so these take its 3 best boxes of every image.
    dense = cfg.pseudo.model_copy(update={"score_threshold": 0.0, "max_boxes": 3})
    _, pairs = label_pool(cfg, teacher, out / "labels", rule=dense)

    # Teacher step: bare, stage, bare.
    tcfg = cfg.teacher
    dataset = family.labeled_dataset(cfg.data, "train", augmentation(tcfg))
    batch = one_batch(family, cfg, dataset, tcfg.batch_size)

    def teacher_loss(model, b):
        return torch.stack(list(family.losses(model, b).values())).sum(0).mean()

    bare = [bare_step_s(cfg, tcfg, batch, teacher_loss, args.steps, args.warmup)]
    device_peak_gib(cfg.device, reset=True)
    stage, _ = stage_step_s(
        lambda on_step: training.train_teacher(
            cfg, out / "teacher", f"t{time.time()}", log=lambda m: None, on_step=on_step
        ),
        args.warmup,
    )
    bare.append(bare_step_s(cfg, tcfg, batch, teacher_loss, args.steps, args.warmup))
    result["teacher"] = {
        "stage_s": round(stage, 3),
        "bare_s": [round(b, 3) for b in bare],
        "img_s": round(tcfg.batch_size / stage, 1),
        "device_peak_gib": device_peak_gib(cfg.device),
    }
    result["teacher"].update(ratio("teacher", statistics.mean(bare) / stage))

    # Student step: bare, stage, bare, on the labeling pair's pseudo-labels.
    from data.mixing import PseudoLabeledShards

    scfg = cfg.student
    stcfg = scfg.train
    human = family.labeled_dataset(cfg.data, "train", augmentation(stcfg))
    pseudo = PseudoLabeledShards(
        pairs, family.decode, family.sidecar_ext, augmentation(stcfg), cfg.data.image_size, seed=0
    )
    batch = one_batch(family, cfg, human, stcfg.batch_size, pseudo, scfg.pseudo_per_batch)
    normalizer = LossNormalizer(scfg.alpha, scfg.loss_ema_decay, scfg.normalize_loss)

    def student_loss(model, b):
        per = torch.stack(list(family.losses(model, b).values())).sum(0)
        n = b["num_human"]
        return normalizer(per[:n].mean(), per[n:].mean())

    bare = [bare_step_s(cfg, stcfg, batch, student_loss, args.steps, args.warmup)]
    device_peak_gib(cfg.device, reset=True)
    stage, rss = stage_step_s(
        lambda on_step: training.train_student(
            cfg, out / "student", f"s{time.time()}", pairs, teacher, log=lambda m: None, on_step=on_step
        ),
        args.warmup,
    )
    bare.append(bare_step_s(cfg, stcfg, batch, student_loss, args.steps, args.warmup))
    result["student"] = {
        "stage_s": round(stage, 3),
        "bare_s": [round(b, 3) for b in bare],
        "img_s": round((stcfg.batch_size + scfg.pseudo_per_batch) / stage, 1),
        "device_peak_gib": device_peak_gib(cfg.device),
    }
    result["student"].update(ratio("student", statistics.mean(bare) / stage))
    result["training_rss"] = {
        "after_warmup_mib": round(rss[args.warmup], 1),
        "last_mib": round(rss[-1], 1),
        "ratio": round(rss[-1] / rss[args.warmup], 3),
    }

    # Memory: peak RSS labeling --shards shards over 2 shards, each in a fresh process.
    peaks = {}
    for n in (2, args.shards):
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--out", str(out), "--family", args.family]
        cmd += ["--device", args.device, "--shards", str(args.shards), "--per-shard", str(args.per_shard)]
        cmd += ["--steps", str(steps)] + (["--quick"] if args.quick else [])
        cmd += [f"--set={o}" for o in args.overrides] + (["--teacher", args.teacher] if args.teacher else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[n] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    result["memory"] = {f"labeling_peak_rss_mib_{n}_shards": round(v, 1) for n, v in peaks.items()}
    result["memory"].update(ratio("memory", peaks[args.shards] / peaks[2]))
    print(json.dumps(result, indent=2))
    (out / "ratios.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
