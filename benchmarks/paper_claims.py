"""The paper's claims at the embedded world's scale: one JSON, a report.md and one plot per claim.

    .venv/bin/python benchmarks/paper_claims.py [--seeds 0 1 2] [--claims a b c d e] \
        [--scale small] [--family detection] [--out runs/claims] [--jobs 3]

Claims (Zoph et al. 2020, *Rethinking Pre-training and Self-training*; Xie et al. 2020):
  a  gain vs augmentation level: students at S1, S2, S3 and S4 from one teacher; in the
     paper gains hold or grow with stronger augmentation.
  b  loss normalization on vs off, at S3, with per-step human and pseudo loss curves; in
     the paper training without it is less stable and gains less.
  c  label fraction: 50, 100 and 200 labeled images; self-training helps at each.
  d  iteration: the round-1 student teaches a round-2 student; round 2 matches or beats
     round 1.
  e  pseudo-label score threshold 0.3, 0.5 and 0.7.

Every cell trains its same-budget control beside its student (`control: true`: the
student's recipe on human labels only, from the same teacher), and every verdict is
read from student minus control, what the pseudo-labels add; student minus teacher
also counts the student's extra steps and is shown beside it.

Every cell is a run of the product's own `noisy_student_flow` in its own run directory,
`<out>/seed-N/<cell>/run`, on one world per seed (`<out>/seed-N/world`). Cells that share a
stage with the seed's base cell (the teacher; the teacher and its pseudo-labels; round 0
for the round-2 cell) start from a hard-linked copy of the base cell's finished stage
folders, so those stages are not trained again: their manifests match and the flow skips
them; a cell whose control is another cell's (the same teacher and student recipe) links
that control. An interrupted benchmark resumes where it stopped (stages resume from their
checkpoints, finished stages are skipped), and a rerun costs a few seconds per cell. The
reported wall time is the sum of every sitting's (`elapsed.json`), so a resume adds its
own minutes to the first run's instead of replacing them.

Each cell's figure is a mean +- standard deviation over the seeds. The verdict of each
claim is computed from those means (see `CLAIMS`); a claim that does not hold is
reported as not holding.

Scales (`SCALES`): `regime` puts the teachers in the paper's regime (REGIME: at least
30 AP or 55 mIoU; the report says, row by row, whether they are) within 150 minutes on
a 2-core CPU for 3 seeds, over one or two sittings (see its comment); `small` is the
earlier 90-minute scale, whose 12 AP teachers are outside that regime; `tiny` runs the
quick demo's toy model in seconds per cell and only checks that the machinery works
(its numbers mean nothing). Each sitting records the reference step
(benchmarks/train_step_time.py) measured before it, so its minutes convert to steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the project, and this folder (demo_seeds)

# Each scale: the world's counts, the steps of the teacher and student, and the preset.
SCALES = {
    # The demo's world with a pool of 1,000, its preset at the recipe's fixed threshold
    # 0.5 (claim e compares 0.3, 0.5 and 0.7), teachers of 600 steps and students and
    # controls of 100. Sized from the detection demo's measured stage times (seed 0,
    # 2026-12-06, reference step 0.67-0.74 s: teacher 618 s per 1,200 steps, student 300 s
    # and control 168 s per 300): per seed 3 teachers (~930 s), 10 students and 7 controls
    # (~1,400 s) and 6 labelings, about 41 minutes, so 3 seeds in about 125 minutes.
    # Measured: 123.7 min for seeds 0-2 in one sitting (2026-12-07, reference step
    # 0.451 s, about 16,450 reference steps; docs/results.md).
    "regime": {
        "quick": False,
        "world": {"n_train": 200, "n_val": 200, "n_unlabeled": 1000, "per_shard": 125},
        "overrides": [
            "teacher.steps=600",
            "student.train.steps=100",
            "student.train.warmup_steps=10",
            "student.train.checkpoint_every=50",
            "student.train.log_every=5",
            "pseudo.score_threshold=0.5",
        ],
    },
    # The demo's world and preset, smaller: a pool of 1,000 unlabeled images, val 100,
    # teachers of 200 steps and students of 60 (the demo: 400 and 150). Per seed 3
    # teachers and 10 students (see CELLS); 3 seeds side by side (--jobs 3) are sized
    # for 90 minutes on a 2-core CPU.
    "small": {
        "quick": False,
        "world": {"n_train": 200, "n_val": 100, "n_unlabeled": 1000, "per_shard": 250},
        "overrides": ["teacher.steps=200", "student.train.steps=60", "student.train.log_every=5"],
    },
    "tiny": {
        "quick": True,
        "world": {"n_train": 16, "n_val": 8, "n_unlabeled": 16, "per_shard": 8},
        "overrides": ["teacher.steps=2", "student.train.steps=2", "student.train.log_every=1"],
    },
}
LEVELS = ("S1", "S2", "S3", "S4")
# The paper's regime: teachers at least this good (Zoph et al. 2020 report self-training
# over teachers of 30-50 AP on COCO and 70-90 mIoU on VOC); a row below it is named.
REGIME = {"AP": 30.0, "mIoU": 55.0}


@dataclass(frozen=True)
class Cell:
    """One run directory per seed. `shares`: stage folders copied from the cell `share_from`."""

    name: str
    overrides: tuple[str, ...] = ()
    shares: tuple[str, ...] = ()
    share_from: str = "base"
    rounds: int = 1
    control_of: str | None = None  # a cell (run before this one) whose round-0 control is this cell's too


def cells_for(claims: list[str], base_level: str) -> list[Cell]:
    """The cells the chosen claims need; the base cell (the preset's student) first."""
    out = {"base": Cell("base")}

    def add(cell: Cell) -> None:
        out.setdefault(cell.name, cell)

    shared = ("round-0/teacher", "round-0/pseudo")
    if "a" in claims or "b" in claims:
        for level in LEVELS if "a" in claims else ("S3",):
            if level != base_level:
                add(Cell(f"level-{level}", (f"student.train.augment_level={level}",), shared))
    if "b" in claims:
        overrides = ("student.train.augment_level=S3", "student.normalize_loss=false")
        add(Cell("norm-off-S3", overrides, shared, control_of=level_cell("S3", base_level)))
    if "c" in claims:
        for n in (50, 100):
            add(Cell(f"labels-{n}", (f"data.labeled_limit={n}",)))
    if "d" in claims:
        add(Cell("round-2", (), ("round-0/teacher", "round-0/pseudo", "round-0/student"), rounds=2))
    if "e" in claims:
        for t in (0.3, 0.7):
            add(Cell(f"threshold-{t}", (f"pseudo.score_threshold={t}",), ("round-0/teacher",), control_of="base"))
    return list(out.values())


def level_cell(level: str, base_level: str) -> str:
    return "base" if level == base_level else f"level-{level}"


# ------------------------------------------------------------------------- running


def link_stage(src: Path, dst: Path) -> None:
    """Hard-link copy of a finished stage folder (the base cell's files stay untouched)."""
    if dst.exists() or not (src / "manifest.json").exists():
        return
    tmp = dst.with_name(dst.name + ".linking")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=os.link)
    tmp.rename(dst)


def run_cell(root: Path, seed: int, cell: Cell, scale: dict, family: str, base_level: str) -> dict:
    """Run (or skip, when finished) one cell; returns its per-round results."""
    from engine.families import get_family
    from flows import stages
    from flows.demo import demo_config

    seed_dir = root / f"seed-{seed}"
    cell_dir = seed_dir / cell.name
    run_dir = cell_dir / "run"  # demo_config's out_dir: <out>/run
    links = [(seed_dir / cell.share_from / "run" / stage, run_dir / stage) for stage in cell.shares]
    if cell.control_of:
        links.append((seed_dir / cell.control_of / "run" / "round-0" / "control", run_dir / "round-0" / "control"))
    for src, dst in links:
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_stage(src, dst)
    overrides = [*scale["overrides"], *cell.overrides, f"rounds={cell.rounds}", "control=true"]
    cfg, _ = demo_config(
        cell_dir, seed, scale["quick"], "cpu", overrides, family, world_dir=seed_dir / "world", sizes=scale["world"]
    )
    t0 = time.perf_counter()
    try:
        summary = stages.noisy_student_flow(cfg)
    except stages.NoPseudoLabels as err:
        # A teacher that keeps no image at this cell's threshold is a result, not a failure:
        # the cell has no student (NaN, left out of the means) and says why.
        metric = get_family(family).metric
        teacher = stages.teacher_outputs(cfg, 0)["metrics"][metric]
        nan = math.nan
        rounds = [
            {
                "teacher": teacher,
                "control": nan,
                "student": nan,
                "gain": nan,
                "over_control": nan,
                "kept": 0,
                "labels": 0,
                "no_pseudo": str(err),
            }
        ]
        return {
            "metric": metric,
            "rounds": rounds,
            "loss_curve": {"step": []},
            "seconds": round(time.perf_counter() - t0, 1),
        }
    from flows.artifacts import round_figures

    metric = summary["metric"]
    rounds = []
    for r in summary["rounds"]:
        f = round_figures(r, metric)
        rounds.append(
            {
                "teacher": f["teacher"],
                "control": f["control"],
                "student": f["student"],
                "gain": f["student - teacher"],
                "over_control": f["student - control"],
                "kept": r["pseudo"]["kept"],
                "labels": r["pseudo"]["labels"],
            }
        )
    curve = loss_curve(run_dir / f"round-{cell.rounds - 1}" / "student" / "train.log")
    return {"metric": metric, "rounds": rounds, "loss_curve": curve, "seconds": round(time.perf_counter() - t0, 1)}


_STEP = re.compile(r"^step (\d+)/\d+ (.*?) \(")


def loss_curve(train_log: Path) -> dict[str, list[float]]:
    """Per logged step: loss_h, loss_p (and the total) from a student's train.log."""
    by_step: dict[int, dict[str, float]] = {}
    if train_log.exists():
        for line in train_log.read_text().splitlines():
            m = _STEP.match(line)
            if m:
                parts = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
                by_step[int(m.group(1))] = {k: float(v) for k, v in parts.items() if k.startswith("loss")}
    steps = sorted(by_step)  # a resumed run logs some steps twice: the last one counts
    keys = sorted({k for v in by_step.values() for k in v})
    return {"step": steps, **{k: [by_step[s].get(k, math.nan) for s in steps] for k in keys}}


# ----------------------------------------------------------------------- aggregating


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), rounded to 2 decimals.
    Non-finite values (a loss curve too short to measure) are left out; none left: NaN."""
    vals = [float(v) for v in values if math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0, "values": []}
    return {
        "mean": round(statistics.fmean(vals), 2),
        "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": [round(v, 2) for v in vals],
    }


def row(label: str, results: dict[int, dict], round_index: int = 0) -> dict:
    """Teacher, control, student, student minus control and student minus teacher ("gain")
    of one cell over seeds (`results`: seed -> run_cell)."""
    rs = [res["rounds"][round_index] for _, res in sorted(results.items())]
    return {
        "value": label,
        "teacher": mean_std([r["teacher"] for r in rs]),
        "control": mean_std([r["control"] for r in rs]),
        "student": mean_std([r["student"] for r in rs]),
        "over_control": mean_std([r["over_control"] for r in rs]),
        "gain": mean_std([r["gain"] for r in rs]),
        "kept": mean_std([r["kept"] for r in rs]),
        "no_pseudo": sum(1 for r in rs if r.get("no_pseudo")),  # seeds whose teacher kept no image
    }


def jitter(curve: dict[str, list[float]], key: str) -> float:
    """Mean absolute step-to-step change of a logged loss over the second half of training."""
    vals = [v for v in curve.get(key, []) if math.isfinite(v)]
    half = vals[len(vals) // 2 :]
    if len(half) < 2:
        return math.nan
    return statistics.fmean(abs(b - a) for a, b in zip(half, half[1:]))


def aggregate(results: dict[str, dict[int, dict]], claims: list[str], base_level: str) -> dict:
    """Per claim: rows of mean +- std over seeds, the expectation and whether it holds.

    `results[cell][seed]` is what `run_cell` returned. Every verdict reads student minus
    control ("over_control"), what the pseudo-labels add. Pure function (tested on its own)."""
    out: dict[str, dict] = {}
    if "a" in claims:
        rows = [row(level, results[level_cell(level, base_level)]) for level in LEVELS]
        g = {r["value"]: r["over_control"]["mean"] for r in rows}
        out["a"] = {
            "title": "Gain vs augmentation level",
            "expected": "every level's student beats its control, and at the strongest levels (S3, S4) by at least "
            "as much as at S1",
            "rows": rows,
            "holds": all(v > 0 for v in g.values()) and max(g["S3"], g["S4"]) >= g["S1"],
        }
    if "b" in claims:
        on, off = results[level_cell("S3", base_level)], results["norm-off-S3"]
        rows = [row("normalized", on), row("not normalized", off)]
        for r, res in zip(rows, (on, off)):
            r["pseudo_loss_jitter"] = mean_std([jitter(v["loss_curve"], "loss_p") for v in res.values()])
            r["human_loss_jitter"] = mean_std([jitter(v["loss_curve"], "loss_h") for v in res.values()])
        out["b"] = {
            "title": "Loss normalization at S3",
            "expected": "normalized training beats the control by at least as much as unnormalized training",
            "rows": rows,
            "holds": rows[0]["over_control"]["mean"] >= rows[1]["over_control"]["mean"],
            "curves": {
                "normalized": {s: v["loss_curve"] for s, v in sorted(on.items())},
                "not normalized": {s: v["loss_curve"] for s, v in sorted(off.items())},
            },
        }
    if "c" in claims:
        rows = [row(str(n), results["base" if n == 200 else f"labels-{n}"]) for n in (50, 100, 200)]
        out["c"] = {
            "title": "Label fraction",
            "expected": "the student beats its control with 50, 100 and 200 labeled images",
            "rows": rows,
            "holds": all(r["over_control"]["mean"] > 0 for r in rows),
        }
    if "d" in claims:
        r2 = results["round-2"]
        rows = [row("round 1", r2, 0), row("round 2", r2, 1)]
        out["d"] = {
            "title": "Iteration",
            "expected": "the round-2 student matches or beats the round-1 student, and beats its own control",
            "rows": rows,
            "holds": rows[1]["student"]["mean"] >= rows[0]["student"]["mean"] and rows[1]["over_control"]["mean"] > 0,
        }
    if "e" in claims:
        cells = {0.3: "threshold-0.3", 0.5: "base", 0.7: "threshold-0.7"}
        rows = [row(str(t), results[c]) for t, c in cells.items()]

        def over(r: dict) -> float:
            return r["over_control"]["mean"] if math.isfinite(r["over_control"]["mean"]) else -math.inf

        best = max(rows, key=over)["value"]
        out["e"] = {
            "title": "Pseudo-label threshold",
            "expected": "the student beats its control at each threshold; the recipe's 0.5 is as good as the others",
            "rows": rows,
            "best": best,
            "holds": all(over(r) > 0 for r in rows) and best == "0.5",
        }
    return out


# --------------------------------------------------------------------------- report


def _pm(c: dict, signed: bool = False) -> str:
    """ "mean ± std"; a difference (`signed`) carries its sign: "+5.43 ± 7.22"."""
    return f"{c['mean']:{'+' if signed else ''}.2f} ± {c['std']:.2f}"


def plot_claim(key: str, claim: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = claim["rows"]
    labels = [r["value"] for r in rows]
    x = range(len(rows))
    if key == "b":
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, part in zip(axes[:2], ("loss_h", "loss_p")):
            for name, style in (("normalized", "-"), ("not normalized", "--")):
                for seed, curve in claim["curves"][name].items():
                    if curve.get(part):
                        ax.plot(curve["step"], curve[part], style, lw=1, label=f"{name}, seed {seed}")
            ax.set_title(f"student {'human' if part == 'loss_h' else 'pseudo'} loss per step")
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        ax = axes[2]
    else:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for part, colour in (("teacher", "tab:gray"), ("control", "tab:orange"), ("student", "tab:blue")):
        ax.errorbar(
            list(x),
            [r[part]["mean"] for r in rows],
            yerr=[r[part]["std"] for r in rows],
            marker="o",
            capsize=3,
            color=colour,
            label=part,
        )
    ax.set_xticks(list(x), labels)
    ax.set_ylabel(f"val {metric} (mean ± std over seeds)")
    ax.set_title(f"({key}) {claim['title']}: {'holds' if claim['holds'] else 'does not hold'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def in_regime(row_: dict, metric: str) -> bool:
    """Whether a row's teachers (their mean over seeds) reach REGIME for `metric`."""
    floor = REGIME.get(metric)
    return floor is None or row_["teacher"]["mean"] >= floor


def report_markdown(result: dict) -> str:
    metric = result["metric"]
    lines = [
        f"# The paper's claims on the embedded world ({result['family']}, scale {result['scale']})",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}; each cell: mean ± std over seeds of val {metric}. "
        f"Wall time {result['elapsed_s'] / 60:.1f} min over {result.get('sittings', 1)} sitting(s)"
        + (
            f" (reference step before each: {', '.join(f'{r:.3f}' for r in result['reference_step_s'])} s)"
            if result.get("reference_step_s")
            else ""
        )
        + ". The control "
        "trains each cell's student recipe on human labels only; the verdicts read student - control.",
        "",
    ]
    for key, claim in result["claims"].items():
        lines += [
            f"## ({key}) {claim['title']}: {'holds' if claim['holds'] else 'does not hold'}",
            "",
            f"Expected: {claim['expected']}.",
            "",
            f"| setting | teacher {metric} | control {metric} | student {metric} | student - control "
            "| student - teacher | images kept |",
            "|---|---|---|---|---|---|---|",
        ]
        low = [r["value"] for r in claim["rows"] if not in_regime(r, metric)]
        for r in claim["rows"]:
            none = f"no student on {r['no_pseudo']} seed(s): no image kept" if r.get("no_pseudo") else None
            student = none if none and r["student"]["n"] == 0 else _pm(r["student"])
            cols = [
                r["value"],
                _pm(r["teacher"]),
                _pm(r["control"]),
                student,
                _pm(r["over_control"], signed=True),
                _pm(r["gain"], signed=True),
                f"{r['kept']['mean']:.0f}",
            ]
            lines.append("| " + " | ".join(str(c) for c in cols) + " |")
        floor = REGIME.get(metric)
        if floor is not None:
            lines += [
                "",
                f"Teachers in the paper's regime (>= {floor:g} {metric}): "
                + ("all rows." if not low else f"not the row(s) {', '.join(low)}, whose verdict says less."),
            ]
        if key == "b":
            lines += ["", "Mean step-to-step change of the loss over the second half of training:", ""]
            for r in claim["rows"]:
                lines.append(
                    f"- {r['value']}: human {_pm(r['human_loss_jitter'])}, pseudo {_pm(r['pseudo_loss_jitter'])}"
                )
        lines += ["", f"![claim {key}]({claim['plot']})", ""]
    return "\n".join(lines)


def run_seed(root: Path, seed: int, cells: list[Cell], scale: dict, family: str, base_level: str) -> dict:
    """Every cell of one seed, in order (the base cell first: the others link its stages);
    the results are also written to <root>/seed-N/results.json."""
    out = {}
    for cell in cells:
        res = run_cell(root, seed, cell, scale, family, base_level)
        out[cell.name] = res
        print(
            json.dumps({"seed": seed, "cell": cell.name, **res["rounds"][-1], "s": res["seconds"]}),
            file=sys.stderr,
            flush=True,
        )
    (root / f"seed-{seed}" / "results.json").write_text(json.dumps(out) + "\n")
    return out


def _seed_subprocesses(args, seeds: list[int]) -> None:
    """Seeds side by side, `args.jobs` at a time, one torch thread and one Prefect home each."""
    import subprocess

    pending, running = list(seeds), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            seed_dir = Path(args.out) / f"seed-{seed}"
            seed_dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--seeds",
                str(seed),
                "--claims",
                *args.claims,
                "--scale",
                args.scale,
                "--family",
                args.family,
                "--out",
                args.out,
                "--seed-only",
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str((seed_dir / "prefect-home").resolve())}
            log = open(seed_dir / "claims.log", "w")
            running[seed] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(2)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(
                        f"seed {seed} failed (exit {proc.returncode}); see {args.out}/seed-{seed}/claims.log"
                    )
                del running[seed]


def add_sitting(root: Path, seconds: float, reference_step_s: float | None = None) -> dict:
    """Add one invocation's wall time to <root>/elapsed.json: {"elapsed_s", "sittings",
    "reference_step_s"} over every sitting so far (an interrupted one included: `main`
    records it on its way out), with each sitting's reference step."""
    path = root / "elapsed.json"
    before = json.loads(path.read_text()) if path.exists() else {"elapsed_s": 0.0, "sittings": 0}
    refs = before.get("reference_step_s", []) + ([round(reference_step_s, 3)] if reference_step_s else [])
    now = {
        "elapsed_s": round(before["elapsed_s"] + seconds, 1),
        "sittings": before["sittings"] + 1,
        "reference_step_s": refs,
    }
    path.write_text(json.dumps(now) + "\n")
    return now


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--claims", nargs="+", default=list("abcde"), choices=list("abcde"))
    p.add_argument("--scale", default="small", choices=sorted(SCALES))
    p.add_argument("--family", default="detection")
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side (one torch thread each)")
    p.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--no-reference", action="store_true", help="skip measuring the reference step (tests; the figures need it)"
    )
    args = p.parse_args(argv)

    from configs import load_config
    from flows.demo import demo_preset

    scale = SCALES[args.scale]
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    preset = load_config(demo_preset(args.family, scale["quick"]), [])
    base_level = preset.student.train.augment_level
    cells = cells_for(args.claims, base_level)
    reference = None
    if not (args.seed_only or args.no_reference):
        from demo_seeds import measure_reference

        reference = measure_reference()
        print(f"reference step {reference:.3f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if args.seed_only:  # one seed of a side-by-side run: the parent keeps the time
        run_seed(root, args.seeds[0], cells, scale, args.family, base_level)
        return 0
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # a stopped sitting still counts
    try:
        if args.jobs > 1 and len(args.seeds) > 1:
            _seed_subprocesses(args, args.seeds)
            per_seed = {s: json.loads((root / f"seed-{s}" / "results.json").read_text()) for s in args.seeds}
        else:
            per_seed = {s: run_seed(root, s, cells, scale, args.family, base_level) for s in args.seeds}
    finally:
        sittings = add_sitting(root, time.perf_counter() - t0, reference)
    results: dict[str, dict[int, dict]] = {c.name: {s: per_seed[s][c.name] for s in args.seeds} for c in cells}
    metric = next(iter(results["base"].values()))["metric"]
    claims = aggregate(results, args.claims, base_level)
    for key, claim in claims.items():
        claim["plot"] = f"claim-{key}.png"
        plot_claim(key, claim, metric, root / claim["plot"])
    result = {
        "benchmark": "paper_claims",
        "family": args.family,
        "scale": args.scale,
        "scale_settings": scale,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "metric": metric,
        "claims": claims,
        "cells": {
            name: {str(s): {k: v for k, v in r.items() if k != "loss_curve"} for s, r in per.items()}
            for name, per in results.items()
        },
        # every sitting's wall time, summed (a resume adds its own, never replaces the first run's)
        **sittings,
    }
    (root / "claims.json").write_text(json.dumps(result, indent=2) + "\n")
    (root / "report.md").write_text(report_markdown(result))
    summary = {
        k: {
            "holds": c["holds"],
            "rows": [
                {"value": r["value"], "over_control": r["over_control"]["mean"], "gain": r["gain"]["mean"]}
                for r in c["rows"]
            ],
        }
        for k, c in claims.items()
    }
    print(json.dumps({"benchmark": "paper_claims", "out": str(root), "claims": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
