"""The pseudo-label audit: how good are the teacher's labels, threshold by threshold?

The round's teacher labels a labeled held-out slice (`audit.split`, its first
`audit.images` images) as if it were unlabeled, under the round's pseudo-label rule at
the sweep's lowest threshold. The family scores those labels against the ground truth
at every threshold of `audit.thresholds` at once (`AuditFamily.audit_counts`: true
positives, false positives and misses per class; boxes matched at `audit.iou`, or
pixels). From the counts come precision, recall and F1 per class and over all classes
(micro: the counts summed over classes), and two recommended thresholds:
- `f1_threshold`: the one with the highest F1 over all classes (the lower one on a tie);
- `precision_threshold`: the lowest one whose precision over all classes meets
  `audit.precision_target` (None when none does).

`pseudo.score_threshold: auto` labels the pool at `f1_threshold`. Pictures: a PR curve
per class (`pr.png`) and a grid of held-out images with the labels kept at the
threshold in use drawn over their ground truth (`grid.jpg`).

Why not pycocotools: COCOeval gives precision at fixed recall points, interpolated over
all scores, not the counts of the labels a rule keeps at a given score threshold, which
is what choosing a pseudo-label threshold needs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from configs import RunConfig
from data import storage
from data.files import atomic_write
from engine.contract import Family
from engine.loop import device_settings
from engine.rundir import atomic_write_json
from engine.training import load_model

REPORT = "audit.json"
PR_PLOT = "pr.png"
GRID = "grid.jpg"  # photographs of noisy scenes: JPEG is a tenth of the PNG


# ----------------------------------------------------------------------------- held-out data


def held_out_samples(family: Family, cfg: RunConfig) -> list[tuple[torch.Tensor, dict]]:
    """The first `audit.images` samples of `audit.split`, at their own sizes."""
    dataset = family.labeled_dataset(cfg.data, cfg.audit.split, None)
    return [dataset[i] for i in range(min(cfg.audit.images, len(dataset)))]


# ----------------------------------------------------------------------------- scores


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (precision with nothing kept is undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def scores(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Precision, recall and F1 from counts `tp`, `fp`, `fn` of one shape (NaN where undefined)."""
    tp, fp, fn = (np.asarray(counts[k], dtype=np.float64) for k in ("tp", "fp", "fn"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1}


def recommend(thresholds: list[float], micro: dict[str, np.ndarray], precision_target: float) -> dict:
    """The F1-maximizing threshold and the lowest threshold meeting the precision target."""
    f1 = np.nan_to_num(micro["f1"], nan=-1.0)
    best = int(np.argmax(f1))  # the first maximum: the lowest threshold on a tie
    meets = [i for i, p in enumerate(micro["precision"]) if not math.isnan(p) and p >= precision_target]
    return {
        "f1_threshold": thresholds[best],
        "f1": float(micro["f1"][best]),
        "precision_threshold": thresholds[meets[0]] if meets else None,
        "precision_target": precision_target,
    }


def summarize(counts: dict[str, np.ndarray], thresholds: list[float], class_names: list[str], target: float) -> dict:
    """The report: per class and over all classes, precision/recall/F1 per threshold."""
    per_class = scores(counts)  # [T, C]
    micro = scores({k: np.asarray(v).sum(1) for k, v in counts.items()})  # [T]

    def clean(a: np.ndarray) -> list:
        return [None if math.isnan(x) else round(float(x), 4) for x in a]

    return {
        "thresholds": list(thresholds),
        "classes": {
            name: {
                **{k: clean(per_class[k][:, c]) for k in ("precision", "recall", "f1")},
                "labels": int(counts["fn"][0][c] + counts["tp"][0][c]),
            }
            for c, name in enumerate(class_names)
        },
        "all": {k: clean(v) for k, v in micro.items()},
        **recommend(thresholds, micro, target),
    }


def at(report: dict, threshold: float) -> dict[str, dict]:
    """{class or "all": {precision, recall, f1}} at the sweep's threshold nearest `threshold`."""
    i = int(np.argmin([abs(t - threshold) for t in report["thresholds"]]))
    rows = {name: {k: v[k][i] for k in ("precision", "recall", "f1")} for name, v in report["classes"].items()}
    rows["all"] = {k: report["all"][k][i] for k in ("precision", "recall", "f1")}
    return rows


# ----------------------------------------------------------------------------- pictures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def pr_plot(report: dict, in_use: float) -> bytes:
    """PNG: one precision-recall curve per class and one over all classes, each point a
    threshold; the F1 and precision-target recommendations and the threshold in use marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*report["classes"].items(), ("all classes", report["all"])]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols + 1.2, 3.0 * rows + 0.6), dpi=100, squeeze=False, layout="constrained"
    )
    ts = report["thresholds"]
    marks = [
        (report["f1_threshold"], "*", "tab:red", f"F1 max ({report['f1_threshold']:g})"),
        (
            report["precision_threshold"],
            "s",
            "tab:green",
            f"precision >= {report['precision_target']:g} ({report['precision_threshold']})",
        ),
        (in_use, "o", "black", f"in use ({in_use:g})"),
    ]
    for ax, (name, curve) in zip(axes.flat, panels):
        pts = [(r, p, t) for r, p, t in zip(curve["recall"], curve["precision"], ts) if r is not None and p is not None]
        if pts:
            ax.plot([x[0] for x in pts], [x[1] for x in pts], "-", color="tab:blue", lw=1.5)
            sc = ax.scatter([x[0] for x in pts], [x[1] for x in pts], c=[x[2] for x in pts], cmap="viridis", s=12)
            for t, marker, colour, label in marks:
                hit = [x for x in pts if t is not None and abs(x[2] - t) < 1e-9]
                if hit:
                    ax.scatter(
                        hit[0][0], hit[0][1], marker=marker, s=90, facecolors="none", edgecolors=colour, label=label
                    )
        ax.axhline(report["precision_target"], color="tab:green", lw=0.6, ls="--")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=name)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[len(panels) - 1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=len(handles))
    if pts:
        fig.colorbar(sc, ax=list(axes.flat), shrink=0.8, label="score threshold")
    return _png(fig)


def grid(panels: list[np.ndarray], legend: str, columns: int = 4) -> bytes:
    """JPEG: the panels (uint8 [H,W,3], any sizes) in a grid under a one-line legend."""
    from PIL import Image, ImageDraw

    if not panels:
        panels = [np.full((64, 256, 3), 255, np.uint8)]
    cell_h = max(p.shape[0] for p in panels)
    cell_w = max(p.shape[1] for p in panels)
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    pad, head = 4, 18
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, head + rows * (cell_h + pad) + pad), "white")
    ImageDraw.Draw(sheet).text((pad, 3), legend, fill="black")
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(p), (pad + c * (cell_w + pad), head + pad + r * (cell_h + pad)))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the stage's work


def audit_teacher(
    cfg: RunConfig,
    checkpoint: str,
    stage_dir: str | Path,
    drawn_threshold: float | None,
    log: Callable[[str], None] = print,
) -> dict:
    """Label the held-out slice with the teacher, score it, write audit.json, pr.png and
    grid.jpg under `stage_dir`, and return the report (without the per-threshold lists).

    `drawn_threshold`: the threshold whose kept labels the grid draws (the rule's; None:
    the F1 threshold, as `score_threshold: auto` will use)."""
    device_settings(cfg.device, cfg.cudnn_benchmark, cfg.host_allocator)
    family, model = load_model(checkpoint, cfg.device)
    samples = held_out_samples(family, cfg)
    thresholds = list(cfg.audit.thresholds)
    names = family.class_names(cfg.data)
    rule = cfg.pseudo.model_copy(update={"score_threshold": thresholds[0]})
    counts = {k: np.zeros((len(thresholds), len(names)), np.int64) for k in ("tp", "fp", "fn")}
    scored_all = []
    batch = cfg.pseudo.batch_size
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        scored = family.scored_labels(model, [s[0] for s in chunk], cfg.data.image_size, rule)
        for (_, target), label in zip(chunk, scored):
            c = family.audit_counts(label, target, thresholds, len(names), cfg.audit.iou)
            for k in counts:
                counts[k] += np.asarray(c[k], np.int64)
        scored_all += scored[: max(0, cfg.audit.grid_images - len(scored_all))]
        log(f"audit: {min(start + batch, len(samples))}/{len(samples)} held-out images labeled")
    report = summarize(counts, thresholds, names, cfg.audit.precision_target)
    in_use = report["f1_threshold"] if drawn_threshold is None else drawn_threshold
    report.update(
        split=cfg.audit.split,
        images=len(samples),
        iou=cfg.audit.iou,
        unit=family.label_unit,
        scoring=family.audit_scoring.format(iou=cfg.audit.iou),
    )
    report["drawn_threshold"] = in_use
    panels = [
        family.draw_audit(image, family.at_threshold(label, in_use), target, names)
        for (image, target), label in zip(samples, scored_all)
    ]
    pr_png = pr_plot(report, in_use)
    grid_jpg = grid(panels, f"held-out images: {family.audit_legend} (labels kept at score >= {in_use:g})")
    stage = storage.path(stage_dir)
    storage.makedirs(stage)
    atomic_write(stage / PR_PLOT, lambda f: f.write(pr_png))
    atomic_write(stage / GRID, lambda f: f.write(grid_jpg))
    atomic_write_json(stage / REPORT, report)
    return report
