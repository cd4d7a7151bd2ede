"""Backbones from timm, randomly initialised or from a local file; nothing is downloaded.

`build_backbone` creates any timm model with `features_only=True`: a pyramid network
(EfficientNet, Tan & Le 2019; BiT's ResNet-v2, Kolesnikov et al. 2020) gives C3-C5
(`out_indices=(2, 3, 4)`, strides 8/16/32); a plain ViT, whose blocks all work at the
patch stride, gives its last block's map as the one level p4 (stride 16), position
embeddings interpolated to each input's size, for the simple pyramid neck
(`nets.necks.SimplePyramid`, Li et al. 2022). Channels and strides are read from timm's
`feature_info`, the input statistics from the model's timm config; none is written
down here. `nets.zoo` adds tiny variants to timm's registry.
"""

from __future__ import annotations

import difflib
import math
import warnings
from typing import NamedTuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

import nets.zoo  # noqa: F401  (registers the project's tiny backbones with timm)

OUT_INDICES = (2, 3, 4)
# The per-channel statistics of ImageNet's RGB images that timm's EfficientNets expect;
# a backbone whose timm config names none uses them too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Parts of a timm classifier that a features_only model does not have; a checkpoint of
# the full classifier carries them and they are dropped without complaint.
HEAD_PREFIXES = ("conv_head.", "bn2.", "global_pool.", "classifier.", "head.", "fc.", "norm.", "fc_norm.")
# Wrappers a state dict may come with: DDP, a whole detector, our own Backbone.
KEY_PREFIXES = ("module.", "backbone.", "body.")
# The efficientnet_pytorch package's names (`_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`,
# ..., `_conv_head`, `_bn1`, `_fc`); a state dict whose keys start so is in its layout.
EFFICIENTNET_PYTORCH_PREFIXES = ("_conv_stem.", "_bn0.", "_blocks.")


def from_efficientnet_pytorch(state: dict[str, torch.Tensor], timm_name: str) -> dict[str, torch.Tensor]:
    """An efficientnet_pytorch state dict under timm's names for the same network.

    The two list the same tensors in the same order (stem, blocks, head; each norm's
    weight, bias, running mean and variance, batch count), so they pair one for one.
    No table of names can do better across the EfficientNet variants, so each pair is
    checked instead: its shape, and its kind (the last name part). Any difference raises
    ValueError naming the pair; nothing is loaded half-mapped."""
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(state) != len(target):
        raise ValueError(
            f"an efficientnet_pytorch state dict of {len(state)} tensors cannot be timm's {timm_name!r} "
            f"({len(target)} tensors): another architecture?"
        )
    out = {}
    for (key, value), (name, want) in zip(state.items(), target.items()):
        if value.shape != want.shape or key.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
            raise ValueError(
                f"efficientnet_pytorch's {key} {tuple(value.shape)} does not pair with timm's {name} "
                f"{tuple(want.shape)} of {timm_name!r}: another architecture?"
            )
        out[name] = value
    return out


def model_input(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A batch [B,3,H,W] on the model's device, in channels_last when the model's weights
    are (`channels_last: true`); the copy is non-blocking (overlapped when pinned)."""
    first = next(model.parameters())
    images = images.to(first.device, non_blocking=True)
    conv = next((p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1), None)
    if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous():
        images = images.contiguous(memory_format=torch.channels_last)
    return images


class Backbone(nn.Module):
    """A timm features_only model whose outputs are named by pyramid level.

    body: a timm model built with `features_only=True`, exposing `feature_info`.
    forward(x float [B, 3, H, W]) -> {"p3": [B, C3, H/8, W/8], "p4": [B, C4, H/16, W/16],
    "p5": [B, C5, H/32, W/32]} for out_indices (2, 3, 4) of a pyramid network, {"p4": ...}
    alone for a plain ViT; level k has stride 2**k. With TF-style "same" padding a side
    that is not a multiple of 32 is rounded up, so pad inputs to the neck's
    `size_divisibility`.

    Attributes: `channels` {level: C}, `strides` {level: stride}, both from feature_info;
    `mean`, `std`: the input statistics of its timm config (ImageNet's if it has none).
    """

    def __init__(self, body: nn.Module, timm_name: str | None = None):
        super().__init__()
        self.body = body
        self.timm_name = timm_name  # the timm model it was built from (a checkpoint's layout may need it)
        cfg = timm.models.get_pretrained_cfg(timm_name) if timm_name else None
        # the per-channel statistics, in [0, 1] units, its weights expect of an RGB input
        self.mean: tuple[float, ...] = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
        self.std: tuple[float, ...] = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
        channels = body.feature_info.channels()
        reductions = body.feature_info.reduction()
        self.strides: dict[str, int] = {}
        self.channels: dict[str, int] = {}
        for c, r in zip(channels, reductions):
            level = int(round(math.log2(r)))
            if 2**level != r:
                raise ValueError(f"feature stride {r} is not a power of two; cannot name its pyramid level")
            self.strides[f"p{level}"] = int(r)
            self.channels[f"p{level}"] = int(c)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.strides, self.body(x)))


class CheckpointReport(NamedTuple):
    """What `load_checkpoint` did; key names are those of the timm features model."""

    loaded: list[str]
    missing: list[str]  # model keys the checkpoint lacked: they keep their random init
    unexpected: list[str]  # checkpoint keys the model lacks, head keys excluded
    dropped_head: list[str]  # classifier-head keys of a full timm model, ignored


def _strip_prefixes(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _features_name(key: str, own: dict) -> str:
    """A classifier's key under the name timm's features model gives the same tensor: as
    is, under `model.` (a ViT's getter wraps the classifier), or with its first dot as an
    underscore (a flattened top level: BiT's `stem.conv` is `stem_conv`)."""
    for name in (key, f"model.{key}", key.replace(".", "_", 1)):
        if name in own:
            return name
    return key


def _fit_pos_embed(saved: torch.Tensor, own: torch.Tensor, body: nn.Module) -> torch.Tensor:
    """A ViT's position embeddings [1, prefix + h*w, C] trained on another grid, resampled
    (bicubic, prefix tokens kept) to the model's; at run time timm interpolates them
    further to each input's size."""
    if saved.shape == own.shape or saved.ndim != 3 or saved.shape[-1] != own.shape[-1]:
        return saved  # equal, or not a grid of this width: the shape check reports it
    prefix = getattr(getattr(body, "model", body), "num_prefix_tokens", 1)
    side = math.isqrt(own.shape[1] - prefix)
    if side * side != own.shape[1] - prefix or math.isqrt(saved.shape[1] - prefix) ** 2 != saved.shape[1] - prefix:
        return saved
    return resample_abs_pos_embed(saved, new_size=[side, side], num_prefix_tokens=prefix)


def load_checkpoint(backbone: Backbone, path: str) -> CheckpointReport:
    """Load a local state dict into `backbone` (CPU, `weights_only=True`).

    Accepts a raw timm state dict (of the full classifier or of a features_only model),
    our Backbone's own state dict, or either under a "state_dict"/"model" entry (a ViT's
    position embeddings of another grid resampled to the model's), and the
    efficientnet_pytorch package's layout (mapped onto timm's names, tensor by tensor:
    `from_efficientnet_pytorch`).
    Raises ValueError if no key matches or a matching key has the wrong shape; warns
    with the key names if some weights are missing or unknown.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {_strip_prefixes(k): v for k, v in state.items()}
    if any(k.startswith(EFFICIENTNET_PYTORCH_PREFIXES) for k in state):
        if backbone.timm_name is None:
            raise ValueError(f"{path}: efficientnet_pytorch's layout, for a backbone of unknown timm name")
        try:
            state = from_efficientnet_pytorch(state, backbone.timm_name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    own = backbone.body.state_dict()
    state = {_features_name(k, own): v for k, v in state.items()}
    for key in [k for k in state if k.endswith("pos_embed") and k in own]:
        state[key] = _fit_pos_embed(state[key], own[key], backbone.body)
    loaded = [k for k in state if k in own]
    if not loaded:
        raise ValueError(
            f"{path}: no key matches the backbone; checkpoint keys start {sorted(state)[:5]}, "
            f"model keys start {sorted(own)[:5]}"
        )
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in loaded if state[k].shape != own[k].shape
    ]
    if wrong_shape:
        raise ValueError(f"{path}: shape mismatch (checkpoint vs model), wrong architecture? {wrong_shape[:5]}")
    extra = [k for k in state if k not in own]
    dropped_head = [k for k in extra if k.removeprefix("model.").startswith(HEAD_PREFIXES)]
    unexpected = [k for k in extra if k not in dropped_head]
    missing = [k for k in own if k not in state]

    backbone.body.load_state_dict({k: state[k] for k in loaded}, strict=False)
    if missing or unexpected:
        warnings.warn(
            f"{path}: loaded {len(loaded)} keys; {len(missing)} missing (kept random) e.g. {missing[:5]}; "
            f"{len(unexpected)} unexpected (ignored) e.g. {unexpected[:5]}",
            stacklevel=2,
        )
    return CheckpointReport(loaded, missing, unexpected, dropped_head)


def build_backbone(name: str, drop_path_rate: float = 0.0, checkpoint: str | None = None) -> Backbone:
    """A `Backbone` by timm name: C3-C5 of a pyramid network ("tf_efficientnet_b7",
    "resnetv2_50x1_bit", "test_efficientnet", "test_resnetv2_bit") or the stride-16 map of a
    plain ViT ("vit_base_patch16_224", "test_vit"). `drop_path_rate`: stochastic depth.

    Always `pretrained=False`: weights come only from the local `checkpoint` file.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        examples = close or ["tf_efficientnet_b0", "tf_efficientnet_b7", "tf_efficientnet_l2", "test_efficientnet"]
        raise ValueError(f"unknown backbone {name!r}; valid timm names include {examples}")
    body = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=OUT_INDICES, drop_path_rate=drop_path_rate
    )
    if len(set(body.feature_info.reduction())) == 1:
        # A plain ViT: every block at the patch stride, so blocks 2-4 would be three maps
        # of one level. Its last block is the one map, at any input size.
        body = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            out_indices=(-1,),
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
        )
    backbone = Backbone(body, name)
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint)
    return backbone
