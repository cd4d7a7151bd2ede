"""Every flow served from one process: `noisy-student serve` (docs/design.md, Deployments and the UI).

`prefect.serve` registers one deployment per flow, named `<flow>/<name>` (`student/local`,
...), with the flow's typed parameters (`cfg: RunConfig`) as its schema, then polls the
Prefect server for runs of them and executes each in a subprocess of this machine. A
run is started from the UI ("Custom run" renders the config as a form) or with

    python -m flows.serve params runs/b7/config.yaml --set student.alpha=2 \
        | prefect deployment run student/local --params - --watch

For several machines, use the work-pool deployments of prefect.yaml instead; both read
the same run directory, so a stage's manifest decides whether it is redone either way.
"""

from __future__ import annotations

import argparse
import inspect
import json

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from configs import load_config
from flows import stages

# The parent flow first: it is the one a user runs most.
FLOWS = (
    stages.noisy_student_flow,
    stages.teacher_flow,
    stages.audit_flow,
    stages.pseudo_label_flow,
    stages.student_flow,
    stages.control_flow,
    stages.soup_flow,
    stages.evaluate_flow,
)
DEFAULT_NAME = "local"


def served_deployments(name: str = DEFAULT_NAME) -> list[RunnerDeployment]:
    """One deployment per flow, loaded by module path so any working directory works."""
    return [
        f.to_deployment(
            name=name,
            description=(f.description or "").strip().split("\n")[0] or None,
            tags=["noisy-student", "served"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for f in FLOWS
    ]


def _annotation(a) -> str:
    """`RunConfig` whether the signature holds the name or the class (the run-lock wrapper resolves them)."""
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def _signature(fn) -> str:
    return ", ".join(
        p.name
        + (f": {_annotation(p.annotation)}" if p.annotation is not p.empty else "")
        + (f" = {p.default!r}" if p.default is not p.empty else "")
        for p in inspect.signature(fn).parameters.values()
    )


def describe(deployments: list[RunnerDeployment]) -> list[str]:
    """The lines `noisy-student serve` prints: one per deployment, then how to run one."""
    lines = [f"serving {len(deployments)} deployments (Ctrl-C stops):"]
    fns = {f.name: f.fn for f in FLOWS}
    for d in deployments:
        ref = f"{d.flow_name}/{d.name}"
        lines.append(f"  {ref:<22} {d.entrypoint}({_signature(fns[d.flow_name])})")
    first = deployments[0]
    lines.append(
        "run one from the UI (Deployments -> Custom run) or: python -m flows.serve params CONFIG.yaml"
        f" [--set key=value ...] | prefect deployment run '{first.flow_name}/{first.name}' --params - --watch"
    )
    return lines


def serve_all(name: str = DEFAULT_NAME, limit: int | None = None) -> None:
    """Register the deployments and execute their runs until interrupted."""
    deployments = served_deployments(name)
    print("\n".join(describe(deployments)), flush=True)
    serve(*deployments, limit=limit, print_starting_message=False)


def run_parameters(config: str, overrides: list[str] | None = None, **extra) -> dict:
    """A deployment run's parameters: the config (a file or preset, with `key=value`
    overrides) as the JSON form of RunConfig under "cfg", plus `extra` ones."""
    return {"cfg": load_config(config, overrides).model_dump(mode="json"), **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description="print a deployment run's parameters as JSON"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    params = sub.add_parser("params", help="the config as a deployment's parameters (for --params -)")
    params.add_argument("config", help="YAML file or preset name")
    params.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    params.add_argument("--round", type=int, default=None, dest="round_index", help="add round_index")
    params.add_argument("--checkpoint", default=None, help="add checkpoint (the evaluate flow)")
    args = parser.parse_args(argv)
    extra = {k: v for k, v in (("round_index", args.round_index), ("checkpoint", args.checkpoint)) if v is not None}
    print(json.dumps(run_parameters(args.config, args.overrides, **extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
