"""`noisy-student` command line.

    noisy-student demo [--family NAME] [--quick] [--seed N] [--out DIR] [--device cpu]
    noisy-student run CONFIG.yaml [--set key.path=value ...]
    noisy-student stage {teacher,audit,pseudo-label,student,control,soup,evaluate} CONFIG.yaml [--round R] [--set ...]
    noisy-student serve [--name local] [--limit N]
    noisy-student plan CONFIG.yaml --gpus N [--images M] [--figures RATIOS.json] [--set ...]
    noisy-student agent --rdzv-endpoint HOST:PORT --nodes N [--processes P] [--local-addr A] [--stages K]
    noisy-student predict CHECKPOINT IMAGES OUT [--threshold 0.5] [--device cpu] [--batch-size N] [--classes ...]
    noisy-student shards build IMAGE_DIR OUT_DIR [--per-shard N] [--prefix pool] [--max-pixels N] [--workers N]
    noisy-student world OUT_DIR [--seed N] [--n-train N] [--n-val N] [--n-unlabeled N]
    noisy-student augment preview OUT.png [--level S3] [--n 16] [--config CONFIG] [--seed N]

demo, run and stage run in a child process that this one supervises, so that Ctrl-C
(or SIGTERM) stops them within seconds, with one line, and leaves no process behind
(flows/supervise.py). Called with an argv (tests, Python callers), `main` runs every
command in the calling process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from data import storage
from flows import supervise

SUPERVISED = ("demo", "run", "stage")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set student.alpha=2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    # configs (pydantic) is imported here, not with the module: from the command line the
    # module's imports run before main() holds Ctrl-C back, so they stay light (the standard
    # library, data.storage and flows.supervise; tests/test_supervise.py checks it).
    from configs import MAX_IMAGE_PIXELS

    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="one Noisy Student round on the embedded synthetic world")
    demo.set_defaults(handler=_demo)
    demo.add_argument("--quick", action="store_true", help="tiny model, a few images (about a minute)")
    demo.add_argument("--seed", type=int, default=0, help="world and training seed")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    demo.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    demo.add_argument(
        "--family",
        default=None,
        help="a family with a demo: detection (COCO boxes, AP; the default), segmentation (VOC class maps, mIoU)",
    )
    _add_set(demo)

    run = sub.add_parser("run", help="all stages and rounds of a config")
    run.set_defaults(handler=_config_command)
    run.add_argument("config", help="YAML file or preset name (see configs/)")
    _add_set(run)

    stage = sub.add_parser("stage", help="run one stage (skipped if up to date)")
    stage.set_defaults(handler=_config_command)
    stage.add_argument("name", choices=[*STAGE_FLOWS, "evaluate"])
    stage.add_argument("config", help="YAML file or preset name")
    stage.add_argument("--round", type=int, default=0, dest="round_index")
    stage.add_argument("--checkpoint", default=None, help="evaluate: model file (default: the round's student)")
    _add_set(stage)

    serve = sub.add_parser(
        "serve", help="serve every flow as a deployment on this machine (needs PREFECT_API_URL for the UI)"
    )
    serve.set_defaults(handler=_serve)
    serve.add_argument("--name", default="local", help="deployment name: <flow>/<name> (default local)")
    serve.add_argument("--limit", type=int, default=None, help="at most N flow runs at once")

    plan = sub.add_parser("plan", help="estimate each stage's wall time, shards per labeling device and Prefect tasks")
    plan.set_defaults(handler=_plan)
    plan.add_argument("config", help="YAML file or preset name")
    plan.add_argument("--gpus", type=int, required=True, help="devices: training ranks; labeling uses up to N")
    plan.add_argument("--images", type=int, default=None, help="unlabeled images (default: counted from the shards)")
    plan.add_argument(
        "--figures",
        default=None,
        help="a JSON of benchmarks/ratios.py to take throughputs from, used if it was measured at the config's "
        "sizes (default: a 30-second probe on this machine)",
    )
    _add_set(plan)

    agent = sub.add_parser(
        "agent",
        help="on another node: join each training stage's rendezvous (train.nodes > 1) and run its ranks here",
    )
    agent.set_defaults(handler=_agent)
    agent.add_argument("--rdzv-endpoint", required=True, help="the stages' train.rdzv_endpoint, HOST:PORT")
    agent.add_argument("--nodes", type=int, required=True, help="the stages' train.nodes (this node included)")
    agent.add_argument("--processes", type=int, default=1, help="ranks on this node (the stages' train.processes)")
    agent.add_argument("--local-addr", default=None, help="this node's address as the others reach it (default FQDN)")
    agent.add_argument("--stages", type=int, default=None, help="stop after K stages (default: keep serving)")
    agent.add_argument("--idle", type=float, default=3600.0, help="stop when no stage came for this many seconds")

    predict = sub.add_parser(
        "predict", help="apply a trained model to a folder of images or to shards: results and pictures"
    )
    predict.set_defaults(handler=_predict)
    predict.add_argument("checkpoint", help="a model.pt a stage wrote")
    predict.add_argument("images", help="a folder of images (searched recursively) or a shard pattern")
    predict.add_argument("out", help="folder for predictions.json, masks/, pictures/ and predict.json")
    predict.add_argument("--threshold", type=float, default=0.5, help="keep boxes or pixels scoring at least this")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--classes", nargs="+", default=None, help="class names (default: the checkpoint's)")
    predict.add_argument("--image-size", type=int, default=None, help="input size (default: the checkpoint's)")
    predict.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, help="skip larger images, undecoded")

    shards = sub.add_parser("shards", help="webdataset shards of unlabeled images")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    build = shards_sub.add_parser("build", help="convert an image folder (ImageNet/OpenImages layout) to shards")
    build.set_defaults(handler=_shards)
    build.add_argument("image_dir")
    build.add_argument("out_dir")
    build.add_argument("--per-shard", type=int, default=1000)
    build.add_argument("--prefix", default="pool")
    build.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="skip (and list) images whose header declares more pixels; they are never decoded "
        "(default: PIL's limit, %(default)s)",
    )
    build.add_argument("--workers", type=int, default=None, help="threads checking images (default: every core)")

    world = sub.add_parser("world", help="write the embedded synthetic world (COCO + VOC + shards)")
    world.set_defaults(handler=_world)
    world.add_argument("out_dir")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--n-train", type=int, default=200)
    world.add_argument("--n-val", type=int, default=200)
    world.add_argument("--n-unlabeled", type=int, default=2000)
    world.add_argument("--per-shard", type=int, default=250)

    from typing import get_args

    from configs import AugmentLevel

    augment = sub.add_parser("augment", help="augmentation levels")
    augment_sub = augment.add_subparsers(dest="augment_command", required=True)
    preview = augment_sub.add_parser(
        "preview", help="PNG grid of augmented labeled train samples (boxes and masks drawn)"
    )
    preview.set_defaults(handler=_augment_preview)
    preview.add_argument("out", metavar="OUT.png")
    preview.add_argument("--level", default="S3", choices=list(get_args(AugmentLevel)))
    preview.add_argument("--n", type=int, default=16, help="number of samples in the grid")
    preview.add_argument("--config", default=None, help="YAML file or preset name (default: the embedded demo world)")
    preview.add_argument("--seed", type=int, default=0, help="sample order and augmentation seed")
    _add_set(preview)
    return parser


def _progress(done: int, total: int) -> None:
    if done == total or done % 500 == 0:
        print(f"\r{done}/{total} files", end="\n" if done == total else "", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # From the command line, a Ctrl-C while starting up stays pending until the
        # supervisor's (or the run's) handler is in place, or the command is known.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    from configs import ConfigError  # configs (pydantic) after the mask: a fifth of a second

    # Prefect's server defaults (no telemetry, a longer start-up) are set in flows/__init__.
    args = build_parser().parse_args(argv)
    if argv is None and args.command in SUPERVISED:
        if supervise.RUN_ENV not in os.environ:
            return supervise.supervise(sys.argv[1:])
        supervise.enter_run()
    elif argv is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        if supervise.in_run():
            supervise.exit_interrupted()
        raise
    except ConfigError as err:
        print(f"noisy-student: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if (message := _clear_message(err)) is None:
            raise
        print(f"noisy-student: {message}", file=sys.stderr)
        return 1


def _clear_message(err: Exception) -> str | None:
    """The message of an error that says what happened and what to do (printed alone,
    without a traceback); None for any other error."""
    from data.files import DiskFullError
    from engine.devices import DeviceError
    from engine.loop import TrainingDiverged
    from engine.predict import PredictError
    from engine.rundir import DamagedOutput, StageNotFinished
    from engine.runlock import RunDirLocked
    from flows.stages import NoPseudoLabels

    clear = (
        DamagedOutput,
        DeviceError,
        DiskFullError,
        NoPseudoLabels,
        PredictError,
        RunDirLocked,
        StageNotFinished,
        TrainingDiverged,
    )
    if isinstance(err, clear):
        return str(err)
    response = getattr(err, "response", None)  # httpx.HTTPStatusError, as Prefect's client raises it
    if getattr(response, "status_code", None) == 401:
        return (
            f"the Prefect server refused the request (401 Unauthorized: {err.request.method} {err.request.url}); "
            "set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING ('user:password')"
        )
    return None


def _shards(args: argparse.Namespace) -> int:
    from data.shards import build_shards_from_folder

    report = build_shards_from_folder(
        args.image_dir, args.out_dir, args.per_shard, args.prefix, _progress, args.max_pixels, args.workers
    )
    if report.get("pattern"):  # absolute, ready for data.unlabeled_shards
        report["pattern"] = str(Path(args.out_dir).resolve() / report["pattern"])
    print(json.dumps({k: v for k, v in report.items() if k != "shards"}, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from engine.predict import predict_images

    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        print(f"\r{done} images", end="", file=sys.stderr, flush=True)

    report = predict_images(
        args.checkpoint,
        args.images,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        threshold=args.threshold,
        classes=args.classes,
        image_size=args.image_size,
        max_pixels=args.max_pixels,
        progress=progress,
    )
    print(file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=2))
    return 0


def _world(args: argparse.Namespace) -> int:
    from data.world import WorldSpec, write_world

    t0 = time.perf_counter()
    paths = write_world(
        args.out_dir, WorldSpec(), args.seed, args.n_train, args.n_val, args.n_unlabeled, args.per_shard
    )
    print(f"world written to {paths.root} in {time.perf_counter() - t0:.1f} s")
    print(f"  COCO: {paths.train_annotations}, {paths.val_annotations}")
    print(f"  VOC:  {paths.voc_root}")
    print(f"  unlabeled shards: {paths.unlabeled_pattern}")
    return 0


def _augment_preview(args: argparse.Namespace) -> int:
    from flows.preview import preview

    print(json.dumps(preview(args.out, args.level, args.n, args.config, args.seed, args.overrides), indent=2))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from engine.launcher import serve_node

    try:
        failed = serve_node(args.rdzv_endpoint, args.nodes, args.processes, args.local_addr, args.stages, args.idle)
    except ValueError as err:  # a bad endpoint, node or process count: the message names it
        print(f"noisy-student: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_all  # Prefect is imported only by the commands that run flows

    serve_all(args.name, args.limit)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine.runlock import hold_run_dir
    from flows.demo import demo_config, demo_preset, format_summary

    out = args.out or f"runs/{demo_preset(args.family, args.quick)}"
    with hold_run_dir(storage.join(out, "run")):  # before the world is written
        cfg, world = demo_config(out, args.seed, args.quick, args.device, args.overrides, args.family)
        from flows import stages

        summary = stages.noisy_student_flow(cfg)
    title = (
        f"\nNoisy Student on the embedded world ({summary['family']}, seed {args.seed}, "
        f"{world['n_train']} labeled + {world['n_unlabeled']} unlabeled images, "
        f"val {world['n_val']})"
    )
    print(format_summary(summary, title))
    return 0


def _config_command(args: argparse.Namespace) -> int:
    """`run` and `stage`: every missing input named at once, before any stage runs."""
    from configs import load_config
    from engine.inputs import check_inputs
    from engine.runlock import hold_run_dir

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg, ALL_STAGES if args.command == "run" else (args.name,))
    if args.command == "stage" and args.name == "evaluate":  # reads the run directory only
        from engine.rundir import RunDir
        from engine.training import MODEL_FILE
        from flows import stages

        ckpt = args.checkpoint or str(RunDir(cfg.out_dir).stage(args.round_index, "student") / MODEL_FILE)
        print(json.dumps(stages.evaluate_flow(cfg, ckpt), indent=2))
        return 0
    with hold_run_dir(cfg.out_dir):
        return _run_stages(args, cfg)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the handler that the subcommand's parser set (`build_parser`)."""
    return args.handler(args)


def _plan(args: argparse.Namespace) -> int:
    from configs import load_config
    from engine import planner

    cfg = load_config(args.config, args.overrides)
    rates = None
    if args.figures:
        if not Path(args.figures).is_file():
            raise SystemExit(f"noisy-student plan: --figures {args.figures}: no such file")
        rates = planner.from_figures(cfg, args.figures, args.gpus)
        if rates is None:
            print(
                f"noisy-student: {args.figures} was measured at other sizes than the config's; probing", file=sys.stderr
            )
    print(planner.format_plan(planner.plan(cfg, args.gpus, args.images, rates), args.config))
    return 0


ALL_STAGES = ("teacher", "audit", "pseudo-label", "student", "control", "soup")
# `stage NAME`: the flow of each stage, called with (flows.stages, config, round).
STAGE_FLOWS = {
    "teacher": lambda stages, cfg, r: stages.teacher_flow(cfg),
    "audit": lambda stages, cfg, r: stages.audit_flow(cfg, r),
    "pseudo-label": lambda stages, cfg, r: {
        k: v for k, v in stages.pseudo_label_flow(cfg, r).items() if k in ("stats", "digest")
    },
    "student": lambda stages, cfg, r: stages.student_flow(cfg, r),
    "control": lambda stages, cfg, r: stages.control_flow(cfg, r),
    "soup": lambda stages, cfg, r: stages.soup_flow(cfg, r),
}


def _run_stages(args: argparse.Namespace, cfg) -> int:
    """`run`, or a `stage` other than evaluate, holding the run directory."""
    from flows import stages

    if args.command == "run":
        from flows.demo import format_summary

        summary = stages.noisy_student_flow(cfg)
        print(format_summary(summary, f"\nNoisy Student ({summary['family']})"))
        return 0
    out = STAGE_FLOWS[args.name](stages, cfg, args.round_index)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
