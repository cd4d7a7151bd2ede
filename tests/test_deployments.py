"""prefect.yaml and `noisy-student serve`, checked with Prefect's own loaders.

`prefect deploy --all` reads prefect.yaml with PrefectYamlModel, loads each entrypoint
with load_flow_from_entrypoint, derives the parameter schema with parameter_schema and
builds schedules with _schedule_config_to_deployment_schedule; the server then checks a
run's parameters against that schema with schema_tools.validate. These tests run the
same functions without a server (tests/test_ui.py runs the real `prefect deploy --all`).
"""

from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate

from configs import RunConfig, load_config
from flows import stages
from flows.serve import FLOWS, describe, main, run_parameters, served_deployments

ROOT = Path(__file__).resolve().parents[1]
STAGE_FLOWS = {obj.name: obj for obj in vars(stages).values() if isinstance(obj, Flow)}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def loaded(prefect_yaml, tmp_path_factory) -> dict[str, tuple[dict, Flow]]:
    """flow name -> (deployment as prefect deploy sees it, the flow its entrypoint loads)."""
    model = PrefectYamlModel.model_validate(prefect_yaml)  # raises where prefect deploy would skip
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # prefect deploy runs from the folder of prefect.yaml
        for d in model.deployments:
            flow = load_flow_from_entrypoint(d.entrypoint, use_placeholder_flow=False)
            assert flow.name not in out, f"two deployments of {flow.name}"
            out[flow.name] = (d.model_dump(exclude_unset=True, mode="json"), flow)
    return out


def test_every_stage_flow_has_one_deployment(loaded):
    assert len(STAGE_FLOWS) == 8, sorted(STAGE_FLOWS)
    assert set(loaded) == set(STAGE_FLOWS)
    for name, (d, flow) in loaded.items():
        # the entrypoint loads the flow of flows/stages.py itself, not a placeholder
        assert flow.fn.__code__.co_code == STAGE_FLOWS[name].fn.__code__.co_code, name
        assert d["entrypoint"].startswith("flows/stages.py:")


def test_no_key_is_silently_ignored(prefect_yaml):
    # Prefect's models ignore unknown keys; a misspelt `schedules` would just vanish.
    for raw in prefect_yaml["deployments"]:
        assert set(raw) <= set(DeploymentConfig.model_fields), set(raw) - set(DeploymentConfig.model_fields)
        assert set(raw["work_pool"]) <= set(WorkPoolConfig.model_fields)


def test_deployments_run_on_one_process_pool_and_enforce_the_schema(loaded):
    for name, (d, _) in loaded.items():
        assert d["work_pool"]["name"] == "noisy-student", name
        assert d["enforce_parameter_schema"] is True, name
        assert d["name"] == "cluster", name


def test_parameter_schemas_are_the_typed_configs(loaded):
    for name, (d, flow) in loaded.items():
        schema = parameter_schema(flow).model_dump()
        assert schema["properties"]["cfg"]["$ref"] == "#/definitions/RunConfig", name
        assert "cfg" in schema["required"]
        run_config = schema["definitions"]["RunConfig"]
        assert run_config["additionalProperties"] is False  # extra="forbid" reaches the server
        assert {"data", "model", "teacher", "pseudo", "student"} <= set(run_config["properties"])
        # default parameters in prefect.yaml must satisfy the schema (cfg comes per run)
        assert validate(d.get("parameters", {}), schema, raise_on_error=True, ignore_required=True) == []


def test_full_run_has_an_inactive_nightly_schedule_with_a_valid_config(loaded):
    d, flow = loaded["noisy-student"]
    (raw,) = d["schedules"]
    schedule = _schedule_config_to_deployment_schedule(dict(raw))
    assert schedule["active"] is False
    assert schedule["schedule"].cron == "0 2 * * *"
    params = {**d.get("parameters", {}), **schedule["parameters"]}
    validate(params, parameter_schema(flow).model_dump(), raise_on_error=True)
    cfg = flow.validate_parameters(params)["cfg"]
    assert isinstance(cfg, RunConfig) and cfg.out_dir == "/runs/nightly" and cfg.pseudo.runner == "dask"


def quick_params(*overrides: str, **extra) -> dict:
    return run_parameters("demo-quick", list(overrides), **extra)


def test_a_custom_run_takes_a_whole_config_with_an_override(loaded):
    _, flow = loaded["pseudo-label"]
    schema = parameter_schema(flow).model_dump()
    params = quick_params("pseudo.score_threshold=0.6", round_index=0)
    assert validate(params, schema, raise_on_error=True) == []  # what the server checks
    bound = flow.validate_parameters(params)  # what the flow run receives
    assert bound["cfg"] == load_config("demo-quick", ["pseudo.score_threshold=0.6"])
    assert bound["cfg"].pseudo.score_threshold == 0.6 and bound["round_index"] == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("studnet", {}, "'studnet' was unexpected"),
        ("pseudo.score_threshold", 2, "maximum"),
        ("pseudo.runner", "ray", "'ray' is not one of"),
    ],
)
def test_the_server_side_schema_refuses_bad_configs(loaded, key, value, message):
    _, flow = loaded["pseudo-label"]
    params = quick_params()
    *parents, leaf = key.split(".")
    node = params["cfg"]
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValidationError, match=message):
        validate(params, parameter_schema(flow).model_dump(), raise_on_error=True)


def test_serve_covers_every_flow_by_module_path():
    deployments = served_deployments("test")
    assert {d.flow_name for d in deployments} == set(STAGE_FLOWS)
    assert {f.name for f in FLOWS} == set(STAGE_FLOWS)
    for d in deployments:
        assert d.name == "test" and d.enforce_parameter_schema
        flow = load_flow_from_entrypoint(d.entrypoint, use_placeholder_flow=False)  # from any folder
        assert flow is STAGE_FLOWS[d.flow_name]
    lines = describe(deployments)
    assert lines[0] == "serving 8 deployments (Ctrl-C stops):"
    assert any("student/test" in line and "cfg: RunConfig, round_index: int = 0" in line for line in lines)


def test_serve_subcommand_is_wired(monkeypatch, capsys):
    import flows.serve
    from flows.cli import main as cli_main

    served = {}
    monkeypatch.setattr(flows.serve, "serve", lambda *ds, **kw: served.update(deployments=ds, **kw))
    assert cli_main(["serve", "--name", "x", "--limit", "2"]) == 0
    assert sorted(d.flow_name for d in served["deployments"]) == sorted(STAGE_FLOWS)
    assert served["limit"] == 2
    assert "student/x" in capsys.readouterr().out


def test_params_prints_a_run_config_for_prefect_deployment_run(capsys):
    import json

    assert main(["params", "demo-quick", "--set", "student.alpha=3", "--round", "0"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["round_index"] == 0
    assert RunConfig.model_validate(params["cfg"]) == load_config("demo-quick", ["student.alpha=3"])
