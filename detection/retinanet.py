"""RetinaNet (Lin et al. 2017) assembled from torchvision parts on our pyramid.

Backbone and neck are injected; the head, focal loss, box coder, matcher and NMS come
from torchvision, except the head with BatchNorm (`LevelNormHead`: shared convs,
BatchNorm per level, as in the TF reference). Unlike torchvision's `RetinaNet`, this module never resizes its
input and its `forward` returns the same raw outputs in train and eval mode; loss and
postprocessing are separate methods, so the caller owns the exact input the model sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import batched_nms, box_iou, sigmoid_focal_loss

from nets.backbone import Backbone
from nets.losses import check_groups, group_scale
from nets.necks import group_norm

LEVELS = ("p3", "p4", "p5", "p6", "p7")


def cell_anchors(size: float, scales_per_octave: int, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Anchors [scales*ratios, 4] (xyxy) centred on 0 for one level of base `size` pixels."""
    out = []
    for octave in range(scales_per_octave):
        s = size * 2 ** (octave / scales_per_octave)
        for r in aspect_ratios:
            w, h = s / math.sqrt(r), s * math.sqrt(r)  # r = h / w, area s^2
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


class LevelNormSubnet(nn.Module):
    """A RetinaNet subnet whose convs are shared by the levels and whose BatchNorms are not.

    `num_convs` x (shared conv3x3 -> BatchNorm of the level -> ReLU), then a shared conv3x3
    predictor of `num_anchors * out_per_anchor` channels. As in the TF reference, each
    level has its own BN statistics and affine parameters: P3 and P7 activations differ
    too much for one set of running statistics to normalize both in eval mode.
    forward(maps: one [B, C, H_l, W_l] per level, finest first) ->
    [B, sum_l H_l * W_l * num_anchors, out_per_anchor], ordered level, y, x, anchor.
    """

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        out_per_anchor: int,
        num_levels: int,
        num_convs: int = 4,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.out_per_anchor = out_per_anchor
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(num_convs))
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_convs)) for _ in range(num_levels)
        )
        self.predictor = nn.Conv2d(channels, num_anchors * out_per_anchor, 3, padding=1)
        for conv in [*self.convs, self.predictor]:
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, bias_init)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.norms):
            raise ValueError(f"expected {len(self.norms)} pyramid levels, got {len(maps)}")
        out = []
        for x, norms in zip(maps, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = torch.relu(norm(conv(x)))
            y = self.predictor(x)
            n, _, h, w = y.shape
            k = self.out_per_anchor
            out.append(y.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        return torch.cat(out, dim=1)


class LevelNormHead(nn.Module):
    """RetinaNet head with per-level BatchNorm; same outputs as torchvision's `RetinaNetHead`."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_levels: int, prior: float = 0.01):
        super().__init__()
        self.classification_head = LevelNormSubnet(
            channels, num_anchors, num_classes, num_levels, bias_init=-math.log((1 - prior) / prior)
        )
        self.regression_head = LevelNormSubnet(channels, num_anchors, 4, num_levels)

    def forward(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cls_logits": self.classification_head(maps), "bbox_regression": self.regression_head(maps)}


def build_head(kind: str, channels: int, num_anchors: int, num_classes: int) -> nn.Module:
    """The head over LEVELS: torchvision's (no norm, or GroupNorm, shared by the levels),
    or `LevelNormHead` for BatchNorm, whose statistics must not be shared."""
    match kind:
        case "none":
            return RetinaNetHead(channels, num_anchors, num_classes, norm_layer=None)
        case "group":
            return RetinaNetHead(channels, num_anchors, num_classes, norm_layer=group_norm)
        case "batch":
            return LevelNormHead(channels, num_anchors, num_classes, len(LEVELS))
    raise ValueError(f"unknown head norm {kind!r}; valid: none, batch, group")


class RetinaNet(nn.Module):
    """Dense one-stage detector over pyramid levels p3..p7.

    forward(images [B,3,H,W], uint8 or float in 0..255; H, W multiples of
    `size_divisibility`) -> dict:
      cls_logits [B, A, K], bbox_regression [B, A, 4] (box-coder deltas),
      anchors [A, 4] xyxy pixels, level_sizes (anchors per level).
    A = sum over levels of H_l * W_l * anchors_per_location, ordered level, y, x, anchor.
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module,
        num_classes: int,
        anchor_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        head_norm: str = "group",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes
        self.size_divisibility = neck.size_divisibility
        self.strides = dict(neck.strides)
        self._cell = {
            lvl: cell_anchors(anchor_scale * self.strides[lvl], scales_per_octave, aspect_ratios) for lvl in LEVELS
        }
        num_anchors = scales_per_octave * len(aspect_ratios)
        self.head = build_head(head_norm, neck.out_channels, num_anchors, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255, persistent=False)
        self._anchor_cache: dict = {}

    # ------------------------------------------------------------------ forward

    def anchors(self, shapes: dict[str, tuple[int, int]], device: torch.device) -> torch.Tensor:
        """All anchors [A, 4] for feature maps of the given (H_l, W_l); cached per shape."""
        key = (tuple(shapes[lvl] for lvl in LEVELS), str(device))
        if key not in self._anchor_cache:
            per_level = []
            for lvl in LEVELS:
                (h, w), stride = shapes[lvl], self.strides[lvl]
                ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
                xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
                y, x = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
                per_level.append((shifts + self._cell[lvl].view(1, -1, 4)).reshape(-1, 4))
            self._anchor_cache[key] = torch.cat(per_level).to(device)
        return self._anchor_cache[key]

    def forward(self, images: torch.Tensor) -> dict:
        h, w = images.shape[-2:]
        if h % self.size_divisibility or w % self.size_divisibility:
            raise ValueError(f"input {h}x{w} is not a multiple of {self.size_divisibility}; pad it (data.augment)")
        x = (images.float() - self.mean) / self.std
        features = self.neck(self.backbone(x))
        maps = [self.dropout(features[lvl]) for lvl in LEVELS]
        out = self.head(maps)
        shapes = {lvl: tuple(m.shape[-2:]) for lvl, m in zip(LEVELS, maps)}
        out["anchors"] = self.anchors(shapes, images.device)
        out["level_sizes"] = [s[0] * s[1] * self._cell[lvl].shape[0] for lvl, s in shapes.items()]
        return out

    # ------------------------------------------------------------------ training

    def loss(
        self, outputs: dict, targets: list[dict], group_sizes: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image shares of the group losses, each a float32 tensor [B].

        loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) summed over anchors that are
        not ignored (IoU in [0.4, 0.5)); loss_box: L1 on box-coder deltas of matched
        anchors. As in the reference, both are summed over a group of images and divided
        by the group's number of matched anchors (at least 1), so an image without
        boxes adds its background terms but no positives to the normaliser.
        group_sizes: consecutive groups of images, normalised separately (a student
        batch: (num_human, num_pseudo)); default one group, the whole batch. Image i of
        a group of n images gets n * (its summed loss) / (the group's matched anchors),
        so the mean over a group's entries is that group's loss. Under torch.distributed
        the matched anchors are counted over every rank's share of the group.
        """
        cls_logits = outputs["cls_logits"].float()
        box_reg = outputs["bbox_regression"].float()
        anchors = outputs["anchors"]
        b, a, k = cls_logits.shape
        group_sizes = check_groups(group_sizes, b)
        cls_target = torch.zeros_like(cls_logits)
        box_target = torch.zeros_like(box_reg)
        fg = torch.zeros(b, a, dtype=torch.bool, device=anchors.device)
        valid = torch.ones(b, a, dtype=torch.bool, device=anchors.device)
        for i, t in enumerate(targets):
            boxes = t["boxes_xyxy"].to(anchors.device)
            if boxes.numel() == 0:
                continue
            matched = self.matcher(box_iou(boxes, anchors))
            fg_i = matched >= 0
            valid[i] = matched != Matcher.BETWEEN_THRESHOLDS
            fg[i] = fg_i
            gt = matched[fg_i]
            cls_target[i, fg_i, t["labels"].to(anchors.device)[gt]] = 1.0
            box_target[i, fg_i] = self.box_coder.encode_single(boxes[gt], anchors[fg_i])
        focal = sigmoid_focal_loss(cls_logits, cls_target, reduction="none").sum(-1)
        sum_cls = (focal * valid).sum(1)
        sum_box = ((box_reg - box_target).abs().sum(-1) * fg).sum(1)
        scale = group_scale(fg.sum(1), group_sizes)
        return {"loss_cls": sum_cls * scale, "loss_box": sum_box * scale}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def candidates(
        self, outputs: dict, image_sizes: list[tuple[int, int]], min_score: float = 0.0, topk_per_level: int = 1000
    ) -> list[dict]:
        """Decoded detections per image before any suppression: no NMS, no cap.

        Every (anchor, class) pair scoring >= `min_score`, at most `topk_per_level` per
        level (highest first); boxes_xyxy [N,4] clipped to image_sizes (H, W), scores
        [N], labels [N], in descending score order, on the host. A pseudo-label rule
        filters these.
        """
        image, boxes, scores, labels = self._decode(outputs, image_sizes, min_score, topk_per_level, strict=False)
        order = scores.argsort(descending=True, stable=True)
        return _per_image(len(image_sizes), image[order], boxes[order], scores[order], labels[order])

    @torch.no_grad()
    def postprocess(
        self,
        outputs: dict,
        image_sizes: list[tuple[int, int]],
        score_thresh: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        topk_per_level: int = 1000,
    ) -> list[dict]:
        """Evaluation detections per image (reference defaults): candidates scoring above
        `score_thresh`, per-class NMS at `nms_iou`, the best `max_detections`.
        boxes_xyxy [N,4] (clipped to image_sizes (H, W)), scores, labels, on the host.

        One NMS covers the batch: its groups are (image, class). Their coordinate offsets
        (group x largest coordinate) reach 10^7 pixels at a batch of 128 images of 80
        classes, where float32 keeps no fractional pixel, so the boxes go to NMS in float64.
        """
        image, boxes, scores, labels = self._decode(outputs, image_sizes, score_thresh, topk_per_level, strict=True)
        keep = batched_nms(boxes.double(), scores.double(), image * self.num_classes + labels, nms_iou)
        return _per_image(len(image_sizes), image[keep], boxes[keep], scores[keep], labels[keep], max_detections)

    def _decode(
        self, outputs: dict, image_sizes: list[tuple[int, int]], min_score: float, topk_per_level: int, strict: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's candidates, flat on the device: (image [N], boxes_xyxy [N,4] clipped
        to its image's (H, W), scores [N], labels [N]).

        A candidate is an (anchor, class) pair scoring above `min_score` (`strict`) or at
        least it, among the `topk_per_level` best of its image's level: one top-k per level
        over every image at once, one box decode for the whole batch, and one host sync
        (the number of candidates)."""
        logits, reg, anchors = outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"]
        k = self.num_classes
        top_scores, top_index, start = [], [], 0
        for n in outputs["level_sizes"]:
            scores = torch.sigmoid(logits[:, start : start + n].float()).flatten(1)  # [B, n * K]
            below = scores <= min_score if strict else scores < min_score
            top = scores.masked_fill(below, -1.0).topk(min(topk_per_level, scores.shape[1]), dim=1)
            top_scores.append(top.values)
            top_index.append(top.indices + start * k)
            start += n
        scores, index = torch.cat(top_scores, 1), torch.cat(top_index, 1)
        image, column = torch.nonzero(scores >= 0, as_tuple=True)  # a sigmoid is >= 0; the masked are -1
        scores, index = scores[image, column], index[image, column]
        anchor = torch.div(index, k, rounding_mode="floor")
        boxes = self.box_coder.decode_single(reg[image, anchor].float(), anchors[anchor])
        hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # [B, 2] (H, W)
        limits = hw.flip(1).repeat(1, 2)[image]  # [N, 4]: W, H, W, H
        return image, torch.minimum(boxes.clamp(min=0), limits), scores, index % k


def _per_image(
    batch: int,
    image: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    limit: int | None = None,
) -> list[dict]:
    """Flat detections -> one dict per image, on the host, in the order given within each
    image and the first `limit` of each. One transfer: boxes, scores, labels and image go
    to the host packed in one float32 tensor (exact for the small integer labels and
    image indices)."""
    image, order = image.sort(stable=True)
    if limit is not None:
        counts = torch.bincount(image, minlength=batch)
        rank = torch.arange(len(image), device=image.device) - (counts.cumsum(0) - counts)[image]
        order, image = order[rank < limit], image[rank < limit]
    packed = torch.cat([boxes[order], scores[order, None], labels[order, None].float(), image[:, None].float()], 1)
    packed = packed.cpu()
    counts = torch.bincount(packed[:, 6].long(), minlength=batch).tolist()
    return [
        {"boxes_xyxy": part[:, :4].contiguous(), "scores": part[:, 4].contiguous(), "labels": part[:, 5].long()}
        for part in packed.split(counts)
    ]
