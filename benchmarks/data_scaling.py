"""The student's gain against the size of the unlabeled pool: 0.25x, 0.5x, 1x and 2x the
demo's 2,000 images (Sun et al. 2017 plot performance against data on a log axis).

    .venv/bin/python benchmarks/data_scaling.py [--seed 0] [--fractions 0.25 0.5 1 2] \
        [--family detection] [--out runs/data-scaling] [--quick]

One world of the demo with a pool of 2x its images (16 shards of 250; the first 8 are
the demo's pool exactly, since scenes are drawn per index). The cell of the largest
fraction runs the demo preset's whole flow; every other cell starts from a hard-linked
copy of its finished teacher and control and runs the pseudo-label and student stages on
the first `pseudo.shard_limit` shards, so every student learns from the same teacher and
is measured against the same control (the student's recipe on human labels only, which
reads no pool). Writes `scaling.json`, `report.md` and `scaling.png` (student minus
control and student minus teacher against pool size, log axis) under --out, and prints
the JSON. Each cell is a run directory of the product's flows: an
interrupted benchmark resumes, a rerun skips finished cells. The reference step
(benchmarks/train_step_time.py) is measured before. Cost: one demo teacher, then one
labeling pass and one student per fraction (about 27 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder when imported

from demo_seeds import measure_reference  # noqa: E402
from paper_claims import link_stage  # noqa: E402

from flows.artifacts import round_figures  # noqa: E402

# The demo's pool and shard size; `--quick`: the quick demo's (a toy model: its numbers
# only show that the machinery works).
POOLS = {False: (2000, 250), True: (48, 16)}


def cell_name(fraction: float) -> str:
    return f"pool-{fraction:g}x"


def run_cell(root: Path, seed: int, fraction: float, largest: float, family: str | None, quick: bool) -> dict:
    from flows import stages
    from flows.demo import demo_config

    pool, per_shard = POOLS[quick]
    shards = round(fraction * pool / per_shard)
    if shards < 1 or abs(shards * per_shard - fraction * pool) > 1e-6:
        raise ValueError(f"fraction {fraction:g} of {pool} images is not a whole number of {per_shard}-image shards")
    cell_dir = root / cell_name(fraction)
    if fraction != largest:  # the same teacher and control as the largest cell's
        for stage in (Path("round-0", "teacher"), Path("round-0", "control")):
            (cell_dir / "run" / stage).parent.mkdir(parents=True, exist_ok=True)
            link_stage(root / cell_name(largest) / "run" / stage, cell_dir / "run" / stage)
    sizes = {"n_unlabeled": round(largest * pool), "per_shard": per_shard}
    overrides = [f"pseudo.shard_limit={shards}", "control=true"]
    cfg, _ = demo_config(cell_dir, seed, quick, "cpu", overrides, family, world_dir=root / "world", sizes=sizes)
    t0 = time.perf_counter()
    summary = stages.noisy_student_flow(cfg)
    r = summary["rounds"][0]
    metric = summary["metric"]
    f = round_figures(r, metric)
    return {
        "fraction": fraction,
        "pool_images": r["pseudo"]["images"],
        "kept": r["pseudo"]["kept"],
        "metric": metric,
        "teacher": round(f["teacher"], 2),
        "control": round(f["control"], 2),
        "student": round(f["student"], 2),
        "over_control": round(f["student - control"], 2),
        "gain": round(f["student - teacher"], 2),
        "held_out": {k: round(v, 2) for k, v in r.get("held_out", {}).items() if k != "split"},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [c["pool_images"] for c in cells]
    ax.plot(xs, [c["over_control"] for c in cells], "o-", label="student - control (the pseudo-labels)")
    ax.plot(xs, [c["gain"] for c in cells], "s--", color="grey", label="student - teacher (also its extra steps)")
    ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x}" for x in xs])
    ax.minorticks_off()
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("unlabeled images (log scale)")
    ax.set_ylabel(f"difference ({cells[0]['metric']})")
    ax.set_title("Gain against pool size, one teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--family", default=None, help="a family with a demo (default: the demo's)")
    parser.add_argument("--out", default="runs/data-scaling")
    parser.add_argument("--quick", action="store_true", help="the quick demo's toy model and pool of 48")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-step measurement")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "data_scaling", "seed": args.seed}
    if not args.no_reference:
        report["reference_step_s"] = measure_reference()
    largest = max(args.fractions)
    cells = []
    for fraction in sorted(args.fractions, reverse=True):  # the largest first: its teacher is everyone's
        cells.append(run_cell(root, args.seed, fraction, largest, args.family, args.quick))
        print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    cells.sort(key=lambda c: c["pool_images"])
    report["cells"] = cells
    plot(cells, root / "scaling.png")
    lines = [
        f"# Gain against the unlabeled pool (seed {args.seed})",
        "",
        f"| pool | images kept | teacher {cells[0]['metric']} | control | student | student - control "
        "| student - teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['pool_images']} ({c['fraction']:g}x) | {c['kept']} | {c['teacher']:.2f} | {c['control']:.2f} | "
        f"{c['student']:.2f} | {c['over_control']:+.2f} | {c['gain']:+.2f} |"
        for c in cells
    ]
    (root / "report.md").write_text("\n".join(lines) + "\n\n![gain against pool size](scaling.png)\n")
    (root / "scaling.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
