"""Teacher and student training stages on top of `engine.loop.fit` (no Prefect here).

`model.pt` holds {"family", "model_cfg", "state"}: enough to rebuild the model
anywhere, loaded with `weights_only=True`.

`train_teacher` and `train_student` train on `processes` processes of their
TrainConfig (engine/launcher.py), on each of its `nodes`: with one process the stage runs
here; with N, the same `_*_rank` function runs once per rank, each rank reading batch_size/N human (and
pseudo) samples per step, and rank 0 writes checkpoint.pt and model.pt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from configs import ModelConfig, RunConfig, TrainConfig
from data import storage
from data.augment import Augment
from data.mixing import PseudoLabeledShards, endless_loader, mixed_batches
from engine import distributed, launcher
from engine.contract import Family
from engine.families import check_config, get_family
from engine.loop import LossNormalizer, TrainingDiverged, device_settings, fit
from engine.rundir import atomic_torch_save, json_digest

MODEL_FILE = "model.pt"


def save_model(
    path: str | Path,
    family: str,
    model_cfg: ModelConfig,
    model: nn.Module,
    class_names: list[str] | None = None,
    image_size: int | None = None,
) -> Path:
    """model.pt: the family, the model's config and weights, and what applying it needs
    without the training data (`noisy-student predict`): its class names and input size."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved = {"family": family, "model_cfg": model_cfg.model_dump(mode="json"), "state": state}
    if class_names is not None:
        saved["class_names"] = list(class_names)
    if image_size is not None:
        saved["image_size"] = int(image_size)
    return atomic_torch_save(saved, path)


def model_info(path: str | Path) -> dict:
    """What `save_model` recorded beside the weights: family, model_cfg, and class_names
    and image_size when recorded."""
    ckpt = storage.torch_load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"family", "model_cfg", "state"} <= set(ckpt):
        raise ValueError(f"{path} is not a model saved by a stage (model.pt); a training checkpoint.pt is not one")
    return {k: v for k, v in ckpt.items() if k != "state"}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Family, nn.Module]:
    """Rebuild a model saved by `save_model`, in eval mode on `device`."""
    ckpt = storage.torch_load(path, map_location="cpu", weights_only=True)
    family = get_family(ckpt["family"])
    model = family.build_model(ModelConfig.model_validate(ckpt["model_cfg"]))
    model.load_state_dict(ckpt["state"])
    return family, model.to(device).eval()


# The teacher each device holds for the labeling tasks of this process: one per device
# (a thread pool binds its workers to several), replaced when another checkpoint or
# another version of the file comes, so a process that labels round after round keeps
# one teacher per device, never one per round.
_TEACHERS: dict[str, tuple[tuple[str, object], tuple[Family, nn.Module]]] = {}
_TEACHERS_LOCK = threading.Lock()


def shared_model(path: str | Path, device: str) -> tuple[Family, nn.Module]:
    """One read-only model per device and process for the labeling tasks that run there."""
    if storage.is_remote(path):  # an object's ETag changes with its content
        key = (str(path), storage.info(path).get("ETag"))
    else:
        p = Path(path)
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    device = str(device)
    with _TEACHERS_LOCK:
        held = _TEACHERS.get(device)
        if held is not None and held[0] == key:
            return held[1]
    loaded = load_model(path, device)
    with _TEACHERS_LOCK:
        _TEACHERS[device] = (key, loaded)
    return loaded


def augmentation(cfg: TrainConfig) -> Augment:
    """The augmentation a training stage applies to its human and pseudo samples."""
    return Augment(cfg.augment_level, cfg.scale_jitter, cfg.randaugment_n, cfg.randaugment_m)


def resume_key(inputs: dict) -> str:
    """Digest of a training stage's inputs without the learning rate (every "lr" key):
    the last good checkpoint of a run that diverged resumes under a changed lr (engine.fit)."""

    def without_lr(x):
        if isinstance(x, dict):
            return {k: without_lr(v) for k, v in x.items() if k != "lr"}
        return [without_lr(v) for v in x] if isinstance(x, list) else x

    return json_digest(without_lr(inputs))


def _launch(fn, args: tuple, tcfg: TrainConfig, lr_setting: str, cfg: RunConfig, log, on_step) -> dict:
    try:
        return launcher.launch(
            fn, args, tcfg.processes, cfg.device, tcfg.dist_backend, log, on_step, tcfg.nodes, tcfg.rdzv_endpoint
        )
    except TrainingDiverged as err:
        err.setting = lr_setting  # the advice names the config key to lower
        raise


def _seed(cfg: TrainConfig, start: int) -> int:
    return cfg.seed * 1_000_003 + start


def _check_classes(family: Family, cfg: RunConfig, model_cfg: ModelConfig) -> None:
    n = family.num_classes(cfg.data)
    if n != model_cfg.num_classes:
        raise ValueError(f"model.num_classes={model_cfg.num_classes} but the dataset has {n} classes")


def _sum_losses(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(losses.values())).sum(0)


def _seed_rank_noise(tcfg: TrainConfig) -> None:
    """After the (identical) model init: distinct augmentation/dropout noise per rank."""
    if distributed.world_size() > 1:
        torch.manual_seed(distributed.rank_seed(tcfg.seed))


def _write_model(
    stage_dir: str | Path, family_name: str, model_cfg: ModelConfig, model: nn.Module, cfg: RunConfig | None = None
) -> None:
    """Rank 0 writes model.pt (with the class names and input size of `cfg`'s data);
    every rank returns once it exists."""
    if distributed.is_main():
        names = get_family(family_name).class_names(cfg.data) if cfg is not None else None
        size = cfg.data.image_size if cfg is not None else None
        save_model(storage.join(stage_dir, MODEL_FILE), family_name, model_cfg, model, names, size)
    distributed.barrier()


def train_teacher(
    cfg: RunConfig,
    stage_dir: str | Path,
    key: str,
    log: Callable[[str], None] = print,
    on_step=None,
    resume_key: str | None = None,
) -> dict:
    """Supervised training on human labels on `cfg.teacher.processes` processes; writes model.pt."""
    return _launch(_teacher_rank, (cfg, str(stage_dir), key, resume_key), cfg.teacher, "teacher.lr", cfg, log, on_step)


def _teacher_rank(
    cfg: RunConfig, stage_dir: str, key: str, resume_key: str | None, *, device: torch.device, log, on_step
) -> dict:
    device_settings(device, cfg.cudnn_benchmark, cfg.host_allocator)
    family = check_config(cfg)
    _check_classes(family, cfg, cfg.model)
    tcfg = cfg.teacher
    rank, ranks = distributed.rank(), distributed.world_size()
    n_human = distributed.per_rank(tcfg.batch_size, ranks)
    torch.manual_seed(tcfg.seed)
    model = family.build_model(cfg.model)
    _seed_rank_noise(tcfg)
    dataset = family.labeled_dataset(cfg.data, "train", augmentation(tcfg))
    log(
        f"teacher: {len(dataset)} labeled images, {tcfg.steps} steps of {tcfg.batch_size}"
        + (f" on {ranks} processes of {n_human}" if ranks > 1 else "")
    )

    def make_batches(start: int):
        human = endless_loader(dataset, n_human, cfg.data.num_workers, _seed(tcfg, start), rank, ranks)
        return mixed_batches(human, None, family.collate)

    def step_loss(model: nn.Module, batch: dict):
        losses = family.losses(model, batch)
        total = _sum_losses(losses).mean()
        return total, {"loss": total.detach(), **{k: v.detach().mean() for k, v in losses.items()}}

    result = fit(
        stage_dir, model, make_batches, step_loss, tcfg, device, key, log=log, on_step=on_step, resume_key=resume_key
    )
    _write_model(stage_dir, cfg.family, cfg.model, model, cfg)
    return result


PSEUDO_PER_BATCH = "pseudo images per batch (round(student.train.batch_size * student.pseudo_ratio))"


def train_student(
    cfg: RunConfig,
    stage_dir: str | Path,
    key: str,
    pseudo_pairs: list[tuple[str, str]],
    teacher_checkpoint: str | Path,
    log: Callable[[str], None] = print,
    on_step=None,
    resume_key: str | None = None,
) -> dict:
    """Joint training on human + pseudo labels with loss normalization, on
    `cfg.student.train.processes` processes; writes model.pt."""
    tcfg = cfg.student.train
    distributed.per_rank(cfg.student.pseudo_per_batch, tcfg.processes * tcfg.nodes, PSEUDO_PER_BATCH)
    args = (cfg, str(stage_dir), key, list(pseudo_pairs), str(teacher_checkpoint), resume_key)
    return _launch(_student_rank, args, tcfg, "student.train.lr", cfg, log, on_step)


def train_control(
    cfg: RunConfig,
    stage_dir: str | Path,
    key: str,
    teacher_checkpoint: str | Path,
    log: Callable[[str], None] = print,
    on_step=None,
    resume_key: str | None = None,
) -> dict:
    """The student's recipe on human labels only (the same model, init, steps, schedule,
    augmentation, noise and human batch; no pseudo image reaches the model): the
    same-budget control that tells what the pseudo-labels add. Writes model.pt."""
    args = (cfg, str(stage_dir), key, None, str(teacher_checkpoint), resume_key)
    return _launch(_student_rank, args, cfg.student.train, "student.train.lr", cfg, log, on_step)


def _student_rank(
    cfg: RunConfig,
    stage_dir: str,
    key: str,
    pseudo_pairs: list[tuple[str, str]] | None,
    teacher_checkpoint: str,
    resume_key: str | None,
    *,
    device: torch.device,
    log,
    on_step,
) -> dict:
    """A student's rank; `pseudo_pairs` None: the control's (human batches only, loss L_h)."""
    device_settings(device, cfg.cudnn_benchmark, cfg.host_allocator)
    family = check_config(cfg)
    scfg = cfg.student
    tcfg = scfg.train
    model_cfg = cfg.student_model
    control = pseudo_pairs is None
    _check_classes(family, cfg, model_cfg)
    rank, ranks = distributed.rank(), distributed.world_size()
    n_human = distributed.per_rank(tcfg.batch_size, ranks)
    n_pseudo = 0 if control else distributed.per_rank(scfg.pseudo_per_batch, ranks, PSEUDO_PER_BATCH)
    torch.manual_seed(tcfg.seed)
    model = family.build_model(model_cfg)
    if scfg.init != "scratch":
        path = teacher_checkpoint if scfg.init == "teacher" else scfg.init_checkpoint
        state = storage.torch_load(path, map_location="cpu", weights_only=True)["state"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"student.init={scfg.init!r}: {path} does not fit the student model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        log(f"{'control' if control else 'student'} initialized from {path}")
    _seed_rank_noise(tcfg)
    human = family.labeled_dataset(cfg.data, "train", augmentation(tcfg))
    on_ranks = f" on {ranks} processes of {n_human}" if ranks > 1 else ""
    if control:
        log(
            f"control: {len(human)} labeled images, no pseudo-labels; batches of {tcfg.batch_size} human, "
            f"{tcfg.steps} steps{on_ranks}"
        )
    else:
        log(
            f"student: {len(human)} labeled images, pseudo labels from {len(pseudo_pairs)} shards; "
            f"batches of {tcfg.batch_size} human + {scfg.pseudo_per_batch} pseudo, {tcfg.steps} steps"
            + (f"{on_ranks} + {n_pseudo}" if ranks > 1 else "")
        )
    normalizer = LossNormalizer(scfg.alpha, scfg.loss_ema_decay, scfg.normalize_loss)

    def make_batches(start: int):
        seed = _seed(tcfg, start)
        human_batches = endless_loader(human, n_human, cfg.data.num_workers, seed, rank, ranks)
        if control:
            return mixed_batches(human_batches, None, family.collate)
        pseudo = PseudoLabeledShards(
            pseudo_pairs,
            family.decode,
            family.sidecar_ext,
            augmentation(tcfg),
            cfg.data.image_size,
            seed=seed,
            rank=rank,
            world_size=ranks,
        )
        return mixed_batches(
            human_batches,
            endless_loader(pseudo, n_pseudo, cfg.data.num_workers, seed + 1, rank, ranks),
            family.collate,
        )

    def step_loss(model: nn.Module, batch: dict):
        per_sample = _sum_losses(family.losses(model, batch))
        n = batch["num_human"]
        loss_h = per_sample[:n].mean()
        if control:
            return loss_h, {"loss": loss_h.detach(), "loss_h": loss_h.detach()}
        loss_p = per_sample[n:].mean()
        loss = normalizer(loss_h, loss_p)
        return loss, {"loss": loss.detach(), "loss_h": loss_h.detach(), "loss_p": loss_p.detach()}

    result = fit(
        stage_dir,
        model,
        make_batches,
        step_loss,
        tcfg,
        device,
        key,
        extra_state=None if control else {"normalizer": normalizer},
        log=log,
        on_step=on_step,
        resume_key=resume_key,
    )
    _write_model(stage_dir, cfg.family, model_cfg, model, cfg)
    return result


def evaluate_checkpoint(
    cfg: RunConfig, checkpoint: str | Path, split: str = "val", results_dir: str | Path | None = None
) -> dict[str, float]:
    """The checkpoint's metrics on `split`; with `results_dir` (created, emptied first) its
    predictions are written there too (the family's `evaluate`)."""
    device_settings(cfg.device, cfg.cudnn_benchmark, cfg.host_allocator)
    family, model = load_model(checkpoint, cfg.device)
    if results_dir is not None:  # no file of an earlier evaluation stays beside the new ones
        storage.makedirs(results_dir)
        for name in storage.list_names(results_dir):
            storage.remove(storage.join(results_dir, name))
        results_dir = storage.text(results_dir)
    return family.evaluate(
        model, cfg.data, cfg.eval_batch_size, cfg.data.num_workers, split=split, results_dir=results_dir
    )
