"""What the Prefect UI shows: metrics per round, pseudo-label statistics, labeling progress,
and pictures (a PNG in a markdown artifact, as a data: URI, which the UI renders).

Artifact keys are stable across reruns (`metrics-table`, `pseudo-stats-round-0`, ...),
so the UI lists each artifact's history under one key.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from data.files import atomic_write


class LabelingProgress:
    """A progress artifact advanced as shards finish (percent of shards).

    The artifact is updated at most once per `min_interval_s`, and when the last shard
    finishes: one API call per shard would cost more than a small shard's labeling.
    """

    def __init__(self, round_index: int, num_shards: int, finished: Sequence[dict] = (), min_interval_s: float = 1.0):
        """`finished`: stats of the shards an earlier, interrupted run labeled."""
        self.total, self.done, self.images = num_shards, len(finished), sum(s["images"] for s in finished)
        self.min_interval_s = min_interval_s
        self.id = create_progress_artifact(
            100.0 * self.done / max(1, num_shards),
            key=f"labeling-progress-round-{round_index}",
            description=f"Pseudo-labeling round {round_index}: shards done of {num_shards}",
        )
        self._updated = time.monotonic()

    def advance(self, shard_stats: dict) -> None:
        self.done += 1
        self.images += shard_stats["images"]
        if self.done < self.total and time.monotonic() - self._updated < self.min_interval_s:
            return
        update_progress_artifact(
            self.id,
            100.0 * self.done / self.total,
            description=f"{self.done}/{self.total} shards, {self.images} images labeled",
        )
        self._updated = time.monotonic()


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def round_figures(r: dict, metric: str) -> dict[str, float | None]:
    """A round's teacher, control (None when not trained) and student metric, student
    minus teacher and student minus control (None without a control): the figures every
    table of a run and every benchmark shows."""
    t, s = r["teacher_metrics"][metric], r["student_metrics"][metric]
    c = r["control_metrics"][metric] if "control_metrics" in r else None
    return {
        "teacher": t,
        "control": c,
        "student": s,
        "student - teacher": s - t,
        "student - control": None if c is None else s - c,
    }


def round_metrics(r: dict, metric: str) -> dict[str, str]:
    """`round_figures` as text: "-" where there is no control."""
    return {
        k: "-" if v is None else (f"{v:+.2f}" if k.startswith("student -") else _fmt(v))
        for k, v in round_figures(r, metric).items()
    }


def metrics_table(rounds: list[dict], metric: str) -> None:
    rows = []
    for r in rounds:
        rows.append(
            {
                "round": r["round"],
                **{
                    f"{k} {metric}" if k in ("teacher", "control", "student") else k: v
                    for k, v in round_metrics(r, metric).items()
                },
                "pseudo images kept": f"{r['pseudo']['kept']}/{r['pseudo']['images']}",
                "pseudo labels": r["pseudo"]["labels"],
            }
        )
    create_table_artifact(
        rows, key="metrics-table", description=f"Teacher, same-budget control and student {metric} per round"
    )


def metrics_table_single(checkpoint: str, metrics: dict) -> None:
    rows = [{"metric": k, "value": _fmt(v)} for k, v in metrics.items()]
    create_table_artifact(rows, key="evaluation", description=f"Metrics of {checkpoint}")


def pseudo_stats(
    round_index: int, total: dict, unit: str, class_names: list[str], extra_rows: list[tuple[str, str]] = ()
) -> None:
    """`unit`: what a label counts (the family's `label_unit`: boxes, pixels);
    `extra_rows`: (name, value) rows of the family's own counts (`stats_rows`)."""
    kept = max(1, total["kept"])
    lines = [
        f"## Pseudo-labels, round {round_index}",
        "",
        "| | |",
        "|---|---|",
        f"| images labeled | {total['images']} |",
        f"| images kept | {total['kept']} ({100 * total['kept'] / max(1, total['images']):.1f}%) |",
        f"| corrupt images skipped | {total['corrupt']} |",
        f"| images above pseudo.max_image_pixels skipped | {total.get('too_large', 0)} |",
        f"| {unit} | {total['labels']} ({total['labels'] / kept:.2f} per kept image) |",
        "",
        "| class | count | share |",
        "|---|---|---|",
    ]
    n = max(1, sum(total["class_counts"]))
    for name, c in zip(class_names, total["class_counts"]):
        lines.append(f"| {name} | {c} | {100 * c / n:.1f}% |")
    lines[9:9] = [f"| {name} | {value} |" for name, value in extra_rows]
    # Histograms a family adds (score_hist: per label; kept_share_hist: per image), in tenths.
    for key in sorted(k for k in total if k.endswith("_hist")):
        hist = total[key] or []
        if any(hist):
            lines += ["", f"| {key.removesuffix('_hist').replace('_', ' ')} | count |", "|---|---|"]
            bins = len(hist)
            for i, c in enumerate(hist):
                if c:
                    lines.append(f"| {i / bins:.1f}-{(i + 1) / bins:.1f} | {c} |")
    create_markdown_artifact(
        "\n".join(lines), key=f"pseudo-stats-round-{round_index}", description="Pseudo-label statistics"
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def audit_markdown(round_index: int, report: dict, pr_png: bytes, grid_jpg: bytes) -> str:
    """The audit's page: recommendations, per-class precision/recall/F1 at the threshold in
    use and at the F1 threshold, the PR curves and the image grid."""
    from engine.audit import at

    unit = report["unit"]
    lines = [
        f"## Pseudo-label audit, round {round_index}",
        "",
        f"The teacher labeled {report['images']} held-out images of the {report['split']} split as if unlabeled; "
        f"its {unit} are scored against the ground truth, {report['scoring']}.",
        "",
        f"- **F1-maximizing threshold: {report['f1_threshold']:g}** (F1 {_pct(report['f1'])} over all classes; "
        "`pseudo.score_threshold: auto` uses it)",
        f"- precision >= {report['precision_target']:g} from threshold: "
        + ("none of the sweep" if report["precision_threshold"] is None else f"**{report['precision_threshold']:g}**"),
        "",
    ]
    shown = sorted({report["drawn_threshold"], report["f1_threshold"]})
    head = " | ".join(f"P / R / F1 at {t:g}" for t in shown)
    lines += [f"| class | ground-truth {unit} | {head} |", "|---|---|" + "---|" * len(shown)]
    tables = [at(report, t) for t in shown]
    counts = {name: c["labels"] for name, c in report["classes"].items()}
    counts["all"] = sum(counts.values())
    for name in [*report["classes"], "all"]:
        cells = " | ".join(
            f"{_pct(tb[name]['precision'])} / {_pct(tb[name]['recall'])} / {_pct(tb[name]['f1'])}" for tb in tables
        )
        lines.append(f"| {name} | {counts[name]} | {cells} |")
    lines += [
        "",
        image_markdown(pr_png, "precision-recall per class"),
        "",
        f"Labels kept at {report['drawn_threshold']:g}, drawn over the ground truth:",
        "",
        image_markdown(grid_jpg, "held-out images with the kept labels of the teacher", "image/jpeg"),
    ]
    return "\n".join(lines)


def audit(round_index: int, report: dict, pr_png: bytes, grid_jpg: bytes) -> None:
    create_markdown_artifact(
        audit_markdown(round_index, report, pr_png, grid_jpg),
        key=f"pseudo-audit-round-{round_index}",
        description=f"Pseudo-label precision and recall on held-out images, round {round_index}",
    )


def soup_table(round_index: int, report: dict, control_val: float | None = None) -> None:
    """Every ingredient and both soups: held-out metric (what the greedy soup chose on) and val;
    last the round's control (the student's recipe on human labels only), when trained."""
    metric, split = report["metric"], report["split"]
    rows = [
        {
            "model": r["name"],
            "made of": ", ".join(r["overrides"]) or "the run's student",
            f"{split} {metric}": _fmt(r["held_out"]),
            f"val {metric}": _fmt(r["val"]),
        }
        for r in report["ingredients"]
    ]
    for name, soup in report["soups"].items():
        rows.append(
            {
                "model": f"{name} soup",
                "made of": " + ".join(soup["ingredients"]),
                f"{split} {metric}": _fmt(soup["held_out"]),
                f"val {metric}": _fmt(soup["val"]),
            }
        )
    if control_val is not None:
        rows.append(
            {
                "model": "control",
                "made of": "the student's recipe on human labels only",
                f"{split} {metric}": "-",
                f"val {metric}": _fmt(control_val),
            }
        )
    create_table_artifact(
        rows,
        key=f"soup-round-{round_index}",
        description=f"Model soups of round {round_index}: ingredients and soups, chosen on {split}, "
        f"reported on val (BatchNorm statistics {report['batchnorm']})",
    )


def image_markdown(image: bytes, alt: str, mime: str = "image/png") -> str:
    """Markdown showing the image inline (a data: URI; the UI renders PNG and JPEG ones of
    several hundred kB). Keep `alt` to plain words: the UI escapes an apostrophe twice."""
    return f"![{alt}](data:{mime};base64,{base64.b64encode(image).decode()})"


def rounds_plot(summary: dict, path: Path) -> Path:
    """The metric per round (the first teacher at round 0, each round's student after it, and
    each round's control where one was trained) as a PNG at `path`, and the `rounds`
    markdown artifact that shows it with its table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rounds = summary["metric"], summary["rounds"]
    xs = [0] + [r["round"] + 1 for r in rounds]
    ys = [rounds[0]["teacher_metrics"][metric]] + [r["student_metrics"][metric] for r in rounds]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(xs, ys, marker="o", label="student (teacher at 0)")
    controls = [(r["round"] + 1, r["control_metrics"][metric]) for r in rounds if "control_metrics" in r]
    if controls:  # each round's control starts from that round's teacher, as its student does
        ax.plot(*zip(*controls), marker="s", linestyle="none", label="control (human labels only)")
        ax.legend(fontsize=7)
    ax.set_xticks(xs, ["teacher"] + [f"round {x - 1}" for x in xs[1:]])
    ax.set_ylabel(metric)
    ax.set_title(
        f"{metric} per round" + (f" (stopped: {summary['stopped']})" if summary.get("stopped") else ""), fontsize=8
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png = buf.getvalue()
    atomic_write(path, lambda f: f.write(png))
    table = report_markdown(summary).split("\n", 2)[2]  # without the title line
    create_markdown_artifact(
        image_markdown(png, f"{metric} per round") + "\n\n" + table,
        key="rounds",
        description=f"{metric} per round",
    )
    return path


def report_markdown(summary: dict) -> str:
    metric = summary["metric"]
    lines = [
        f"# Noisy Student run ({summary['family']})",
        "",
        f"| round | teacher {metric} | control {metric} | student {metric} | student - teacher | student - control "
        "| pseudo kept | pseudo labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rounds"]:
        m = round_metrics(r, metric)
        p = r["pseudo"]
        lines.append(f"| {r['round']} | {' | '.join(m.values())} | {p['kept']}/{p['images']} | {p['labels']} |")
    if any("control_metrics" in r for r in summary["rounds"]):
        lines += [
            "",
            "The control trains the student's recipe (init, steps, schedule, augmentation, noise, human batch) "
            "on human labels only: student - control is what the pseudo-labels add.",
        ]
    else:
        lines += ["", "No control was trained (`control: false`): student - teacher also counts the student's steps."]
    held = [r for r in summary["rounds"] if "held_out" in r]
    if held:
        lines += ["", "Held-out figures (what settings and `rounds: auto` are decided on; val is reported):", ""]
        for r in held:
            h = r["held_out"]
            control = f", control {h['control']:.2f}" if "control" in h else ""
            lines.append(
                f"- round {r['round']}: teacher {h['teacher']:.2f}{control}, student {h['student']:.2f} "
                f"({h['student'] - h['teacher']:+.2f} over the teacher) {metric} on {h['split']}"
            )
    if summary.get("stopped"):
        lines += ["", f"Rounds stopped: {summary['stopped']}."]
    lines += ["", f"Elapsed: {summary['elapsed_s']:.0f} s", ""]
    return "\n".join(lines)
