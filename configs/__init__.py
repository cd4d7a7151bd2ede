"""Typed configuration of a run, and the YAML presets beside this file.

Every concern has its own frozen pydantic model (`extra="forbid"`): a mistyped key
fails before anything runs, naming the key's path and the allowed keys. These
models are the flows' parameters, so Prefect validates them and renders them as
forms in the UI. Configs carry paths and numbers, never tensors.

Presets: `load_config("demo")` or `load_config("path/to/file.yaml", ["student.alpha=2"])`.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).parent

AugmentLevel = Literal["none", "S1", "S2", "S3", "S4"]
MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS (data/shards.py checks that they agree)
Precision = Literal["off", "bf16", "fp16"]


def _precision(v: Any) -> Any:
    """`amp: true/false` (configs written before amp named a dtype) -> bf16 / off."""
    return {True: "bf16", False: "off"}.get(v, v) if isinstance(v, bool) else v


CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def run_setting(default: Any, **kwargs: Any) -> Any:
    """A field that says how a stage runs, not what it computes (workers, logging,
    process count, ...). It is left out of `digest_view`, so changing it neither
    restarts a stage nor invalidates the stages after it."""
    return Field(default, json_schema_extra={"digest": False}, **kwargs)


def held_out(**kwargs: Any) -> Any:
    """A field naming held-out data: left out of `digest_view` like a run setting, since
    no training stage reads it; the stages that do (audit, soup) digest what they read."""
    return Field(None, json_schema_extra={"digest": False}, **kwargs)


def _digested(field: Any) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("digest") is False)


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest_view(self) -> dict[str, Any]:
        """The JSON form of the fields that decide a stage's result (all but the
        `run_setting` ones), nested configs included: what stage digests are made of."""
        dumped = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if not _digested(field):
                continue
            value = getattr(self, name)
            out[name] = value.digest_view() if isinstance(value, _Config) else dumped[name]
        return out


class DataConfig(_Config):
    """Where the labeled and unlabeled data live.

    `format` names the layout of the labeled data: `coco` (a COCO json and its image
    folder per split) or `voc` (a PASCAL VOC root). Which formats a run may use, and
    which of the keys below each needs, is its family's to say (`data_formats`,
    engine/families.py `check_config`).
    """

    format: str = Field("coco", description="layout of the labeled data (coco, voc): one its family reads")
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    voc_root: str | list[str] | None = Field(
        None, description="a VOC folder (VOCdevkit/VOC2012); detection may combine several: a list"
    )
    voc_train_split: str = Field(
        "train", description="id list ImageSets/Segmentation/<split>.txt (train_aug: the SBD-augmented set)"
    )
    voc_val_split: str = "val"
    voc_train_masks: str = Field(
        "SegmentationClass", description="mask folder of the train split (SegmentationClassAug for SBD)"
    )
    voc_classes: tuple[str, ...] | None = Field(
        None,
        description="class names in label order (segmentation: background first); None: VOC's own "
        "(the 21 with background for segmentation, the 20 object classes for detection)",
    )
    labeled_limit: int | None = Field(None, ge=1, description="use only the first N labeled images (a label fraction)")
    # The held-out labeled split: no teacher or student trains on it, so it stays out of
    # their digests; the audit and soup stages digest the samples they read from it.
    holdout_images: str | None = held_out(description="image folder of the held-out split (format coco)")
    holdout_annotations: str | None = held_out(description="COCO json of the held-out split (format coco)")
    voc_holdout_split: str | None = held_out(
        description="id list ImageSets/Segmentation/<split>.txt of the held-out split (format voc)"
    )
    unlabeled_shards: str | list[str] = run_setting(
        "",
        description="webdataset image shards: one brace pattern such as pool-{000000..000012}.tar (spaces "
        "in it are part of the path), or a list of them (the pseudo-label stage digests the shards themselves)",
    )
    image_size: int = Field(640, ge=128, description="square training/eval size; multiple of 128")
    num_workers: int = run_setting(1, ge=0, description="DataLoader workers per loader")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.image_size % 128:
            raise ValueError(f"data.image_size={self.image_size} must be a multiple of 128 (P7 stride)")
        return self


class ModelConfig(_Config):
    """Architecture of a detector or segmenter (the family decides which head)."""

    backbone: str = Field(
        "tf_efficientnet_b0",
        description="a timm model name: an EfficientNet, a BiT ResNet-v2 (resnetv2_50x1_bit) or a plain ViT "
        "(vit_base_patch16_224, with neck simple); test_efficientnet, test_resnetv2_bit and test_vit are tiny",
    )
    backbone_checkpoint: str | None = Field(None, description="local timm/backbone weights file")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth (student noise)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the class predictor")
    neck: Literal["fpn", "nasfpn", "simple"] = Field(
        "fpn", description="fpn, nasfpn (both on C3-C5), or simple: the pyramid of a plain ViT's one stride-16 map"
    )
    neck_channels: int = Field(64, ge=8)
    nasfpn_repeats: int = Field(3, ge=1)
    separable: bool = False
    head_norm: Literal["none", "batch", "group"] = "group"
    num_classes: int = Field(80, ge=1)
    anchor_scale: float = Field(4.0, gt=0, description="anchor size = anchor_scale * stride")


class TrainConfig(_Config):
    """One training stage: optimizer, schedule, augmentation, checkpointing."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="labeled images per step (student: human part)")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(10.0, gt=0)
    augment_level: AugmentLevel = "S1"
    scale_jitter: tuple[float, float] | None = Field(
        None,
        description="scale jitter (min, max) of the training size at S1-S4; None: the level's "
        "(S1/S2 0.8-1.2, S3/S4 0.5-2.0); the PASCAL VOC recipe uses [0.2, 1.5]",
    )
    randaugment_n: int = Field(2, ge=0, description="S4: RandAugment ops per image (N)")
    randaugment_m: float = Field(10.0, ge=0, le=10, description="S4: RandAugment magnitude (M), 0-10")
    checkpoint_every: int = run_setting(100, ge=1)
    log_every: int = run_setting(25, ge=1)
    seed: int = 0
    amp: Precision = Field(
        "off",
        description="autocast dtype: bf16 (CPU, and CUDA from Ampere on; no loss scaling), fp16 (with a "
        "GradScaler, for GPUs without bf16), off: fp32; true means bf16",
    )
    channels_last: bool = run_setting(False, description="model and input batches in channels_last memory format")
    compile: CompileMode = run_setting(
        "off", description="torch.compile mode for the training step's model (off, default, reduce-overhead, ...)"
    )
    processes: int = run_setting(
        1,
        ge=1,
        description="training processes on this machine (torch.distributed ranks, one GPU each on CUDA); "
        "each draws batch_size/processes samples of the global batch; a checkpoint resumes on any number",
    )
    nodes: int = run_setting(
        1,
        ge=1,
        description="machines the stage trains on, `processes` ranks each; nodes > 1 needs rdzv_endpoint, and "
        "`noisy-student agent` running on every other node (docs/clusters.md, Training on several nodes)",
    )
    rdzv_endpoint: str = run_setting(
        "",
        description="HOST:PORT where the other nodes reach this one (the rendezvous store is served here); "
        "needed with nodes > 1; empty: 127.0.0.1 at a free port",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = run_setting(
        "auto", description="torch.distributed backend with processes > 1; auto: nccl on CUDA, gloo on CPU"
    )
    sync_batchnorm: bool = Field(
        True,
        description="with processes > 1, BatchNorm uses statistics of the global batch, as one process would; "
        "off: each process normalizes over its own batch_size/processes samples",
    )

    _amp_from_bool = field_validator("amp", mode="before")(lambda v: _precision(v))

    @field_validator("scale_jitter")
    @classmethod
    def _jitter_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check_split(self) -> TrainConfig:
        ranks = self.processes * self.nodes
        if self.batch_size % ranks:
            where = f"processes={self.processes}" + (f" x nodes={self.nodes}" if self.nodes > 1 else "")
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by {where}: "
                "each process draws batch_size/processes samples of the global batch"
            )
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nodes={self.nodes} needs rdzv_endpoint (HOST:PORT of this node, reachable from the others)"
            )
        return self


class PseudoLabelConfig(_Config):
    """Teacher labeling of the unlabeled pool (docs/recipe.md, Pseudo-labels)."""

    score_threshold: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        0.5, description="keep labels scoring at least this; auto: the round's audit's F1-maximizing threshold"
    )
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_boxes: int = Field(100, ge=1)
    per_class_cap: int | None = Field(None, ge=1, description="at most N labels of a class per image")
    batch_size: int = run_setting(32, ge=1, description="images per teacher forward (larger on a GPU: 64-256)")
    amp: Precision = Field(
        "off",
        description="autocast dtype of the teacher's forward (see teacher.amp)",
    )
    decode_threads: int = run_setting(
        1, ge=1, description="threads decoding the next batches while the teacher runs (a GPU wants 4-8)"
    )
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS,
        ge=1,
        description="an unlabeled image whose header declares more pixels is skipped and counted, never decoded "
        "(default: PIL's decompression-bomb limit, about 9,459 x 9,459)",
    )
    runner: Literal["thread", "process", "dask"] = run_setting(
        "thread", description="thread or process: a pool on this machine; dask: a Dask cluster, one task per shard"
    )
    max_workers: int = run_setting(
        2, ge=1, description="pool size, or worker processes of the LocalCluster the dask runner starts"
    )
    devices: tuple[str, ...] = run_setting(
        (),
        description="torch devices the labeling workers are dealt in turn, one teacher each; empty: every "
        "visible GPU when device is cuda, else the run's device (Dask workers started by hand keep their own)",
    )
    dask_address: str | None = run_setting(
        None, description="running Dask scheduler (tcp://host:8786); None: the dask runner starts a LocalCluster"
    )
    shards_per_task: int | None = run_setting(
        None,
        ge=1,
        description="shards one Prefect task labels in a row; None: sized for 16 tasks per worker and "
        "at least 100 tasks, rounded up (one per shard when there are fewer shards)",
    )
    shard_limit: int | None = Field(None, ge=1, description="label only the first N shards")
    scales: tuple[float, ...] = Field(
        (1.0,), min_length=1, description="segmentation teacher: average softmax over these input scales"
    )

    _amp_from_bool = field_validator("amp", mode="before")(lambda v: _precision(v))

    def chunk_size(self, shards: int) -> int:
        """Shards per labeling task for `shards` shards to label (`shards_per_task`)."""
        if self.shards_per_task is not None:
            return self.shards_per_task
        tasks = min(shards, max(16 * self.max_workers, 100))
        return max(1, math.ceil(shards / max(1, tasks)))

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [s for s in v if not 0 < s <= 4]
        if bad:
            raise ValueError(f"pseudo.scales must lie in (0, 4], got {bad}")
        return v


def _default_thresholds() -> tuple[float, ...]:
    return tuple(round(0.05 * i, 2) for i in range(1, 20))


class AuditConfig(_Config):
    """The pseudo-label audit (flows/stages.py `audit_flow`): each round's teacher labels a
    labeled held-out slice as if it were unlabeled, under the pseudo-label rule, and the
    labels are scored against the ground truth at every threshold of `thresholds`."""

    split: Literal["holdout", "val"] | None = Field(
        None,
        description="labeled split to audit on: holdout (data.holdout_* / data.voc_holdout_split) or val "
        "(tuning a threshold on val biases the val metrics); None: no audit",
    )
    images: int = Field(100, ge=1, description="audit the first N images of the split")
    thresholds: tuple[float, ...] = Field(
        default_factory=_default_thresholds, min_length=1, description="score thresholds of the sweep"
    )
    precision_target: float = Field(
        0.9, gt=0, le=1, description="the second recommendation: the lowest threshold whose precision meets this"
    )
    iou: float = Field(0.5, gt=0, le=1, description="detection: a label matches a box at this IoU")
    grid_images: int = run_setting(12, ge=0, description="images drawn in the audit's picture grid")

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in v if not 0 <= t <= 1]
        if bad:
            raise ValueError(f"audit.thresholds must lie in [0, 1], got {bad}")
        return tuple(sorted(set(v)))


# Model keys a student may set apart from its teacher and still start from its weights:
# its noise, and where the backbone's first weights come from.
STUDENT_NOISE_KEYS = ("drop_path_rate", "dropout", "backbone_checkpoint")


class StudentConfig(_Config):
    """The noised student: joint human + pseudo training with loss normalization."""

    train: TrainConfig = TrainConfig()
    model: ModelConfig | None = Field(
        None,
        description="None: the teacher's architecture; another (a larger EfficientNet, a BiT, a ViT) needs "
        "init scratch or checkpoint",
    )
    pseudo_ratio: float = Field(1.0, gt=0, description="pseudo images per human image in a batch")
    alpha: float = Field(1.0, ge=0, description="weight of the pseudo loss")
    normalize_loss: bool = True
    loss_ema_decay: float = Field(0.99, ge=0, lt=1)
    init: Literal["scratch", "teacher", "checkpoint"] = "scratch"
    init_checkpoint: str | None = None

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        if self.init == "checkpoint" and not self.init_checkpoint:
            raise ValueError("student.init='checkpoint' needs student.init_checkpoint")
        return self

    @property
    def pseudo_per_batch(self) -> int:
        return max(1, round(self.train.batch_size * self.pseudo_ratio))


class SoupConfig(_Config):
    """Model soups of the round's students (flows/stages.py `soup_flow`, engine/soups.py).

    The ingredients are the round's student and one more student per entry of
    `ingredients`, each trained with those overrides of the student section (a small
    sweep of alpha, augmentation level, seed...). They must share one initialization:
    `student.init` teacher or checkpoint (a seed then changes only the data order and
    noise), or scratch without changing the seed."""

    ingredients: tuple[tuple[str, ...], ...] = Field(
        (),
        description="per extra ingredient, student overrides such as ['student.alpha=0.5'] or "
        "['student.train.seed=1']; empty: no soup",
    )
    split: Literal["holdout"] = Field(
        "holdout", description="the greedy soup's held-out split (never val: val is what the soups are reported on)"
    )

    @field_validator("ingredients")
    @classmethod
    def _student_keys_only(cls, v: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        for i, overrides in enumerate(v, 1):
            for item in overrides:
                key = item.split("=", 1)[0].strip()
                if "=" not in item or not key.startswith("student."):
                    raise ValueError(f"soup ingredient {i}: {item!r} is not a student.<key>=<value> override")
        return v


class RunConfig(_Config):
    """A whole Noisy Student run: all stages of all rounds."""

    family: str = "detection"
    out_dir: str = run_setting("runs/default")
    rounds: Annotated[int, Field(ge=1)] | Literal["auto"] = run_setting(
        1,
        description="self-training rounds (each round's stages are digested alone); auto: rounds until a "
        "student gains less than min_gain over its teacher on the held-out split, at most max_rounds",
    )
    min_gain: float = run_setting(
        0.5, description="rounds: auto stops after a round whose student gains less than this on the held-out split"
    )
    max_rounds: int = run_setting(5, ge=1, description="rounds: auto runs at most this many rounds")
    control: bool = run_setting(
        False,
        description="also train each round's control: the student's recipe (init, steps, schedule, augmentation, "
        "noise, human batch) on human labels only, so that student minus control is what the pseudo-labels add",
    )
    device: str = run_setting("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    eval_batch_size: int = run_setting(32, ge=1)
    cudnn_benchmark: bool = run_setting(
        True, description="on CUDA, let cuDNN pick the fastest kernels for the (fixed) input size"
    )
    host_allocator: Literal["tuned", "default"] = run_setting(
        "tuned",
        description="tuned: glibc keeps freed host memory in the process instead of faulting fresh pages in every "
        "step (CPU steps of 32 images at 128 px: 1.30x faster for B0 + NAS-FPN, 1.14x for B0 + FPN on "
        "2026-12-04; benchmarks/cpu_settings.py); default: the C library's own settings",
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    teacher: TrainConfig = TrainConfig()
    pseudo: PseudoLabelConfig = PseudoLabelConfig()
    audit: AuditConfig = AuditConfig()
    student: StudentConfig = StudentConfig()
    soup: SoupConfig = SoupConfig()

    @model_validator(mode="before")
    @classmethod
    def _student_model_from_teacher(cls, data: Any) -> Any:
        """A student's `model` section names only what differs from the teacher's `model`
        (`{backbone: tf_efficientnet_b1}`); every other key, `num_classes` included, is the
        teacher's, except the teacher's `backbone_checkpoint` under another backbone."""
        if not isinstance(data, dict) or not isinstance(data.get("student"), dict):
            return data
        student = data["student"]
        if not isinstance(student.get("model"), dict):
            return data
        teacher = data.get("model") or {}
        if isinstance(teacher, BaseModel):
            teacher = teacher.model_dump()
        if not isinstance(teacher, dict):
            return data  # not a mapping: the model field's own validation names it
        if student["model"].get("backbone", teacher.get("backbone")) != teacher.get("backbone"):
            # the teacher's weights file fits the teacher's backbone only
            teacher = {k: v for k, v in teacher.items() if k != "backbone_checkpoint"}
        return {**data, "student": {**student, "model": merge(teacher, student["model"])}}

    @model_validator(mode="after")
    def _check_audit(self) -> RunConfig:
        if self.pseudo.score_threshold == "auto" and self.audit.split is None:
            raise ValueError(
                "pseudo.score_threshold='auto' takes the audit's F1 threshold, but audit.split is None; "
                "set audit.split=holdout (or val)"
            )
        # Whether the held-out split that audit.split=holdout, the soup and rounds=auto
        # choose on is named depends on the data's layout: engine/families.py check_config.
        if self.student.init == "teacher" and self.student.model is not None:
            differ = [
                f"{key}: teacher {getattr(self.model, key)!r}, student {getattr(self.student.model, key)!r}"
                for key in ModelConfig.model_fields
                if key not in STUDENT_NOISE_KEYS and getattr(self.model, key) != getattr(self.student.model, key)
            ]
            if differ:
                raise ValueError(
                    f"student.init='teacher' copies the teacher's weights, but student.model is another "
                    f"architecture ({'; '.join(differ)}); use student.init=scratch or checkpoint"
                )
        return self

    @property
    def student_model(self) -> ModelConfig:
        return self.student.model or self.model


# --------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            lines.append(
                f"{path}: unknown key"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed: {', '.join(allowed)}"
            )
        elif isinstance(e.get("input"), dict):
            # A check across several keys of a section: its message names them and their values.
            lines.append(f"{path or '<root>'}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{path or '<root>'}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["student.alpha=2", "teacher.steps=10"]` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or preset {str(name_or_path)!r}; presets: {', '.join(names)}")


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    raw = merge(raw, parse_overrides(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid config:\n" + _explain(err, RunConfig)) from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML preset or file into a RunConfig, applying `key.path=value` overrides."""
    path = resolve_preset(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if raw.get("out_dir") == ".":  # a run directory's own config.yaml: the run is the folder that holds it
        raw["out_dir"] = str(path.parent)
    return build_config(raw, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
