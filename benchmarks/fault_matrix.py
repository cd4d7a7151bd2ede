"""The fault table: each fault, bad input or security case, what should happen, and what
its tests observe.

    .venv/bin/python benchmarks/fault_matrix.py           # every case: about 20 min on 2 busy cores
    .venv/bin/python benchmarks/fault_matrix.py --fast    # the cases with tests outside the slow marker
    .venv/bin/python benchmarks/fault_matrix.py --list    # cases and their tests, nothing run
    .venv/bin/python benchmarks/fault_matrix.py --case "disk full"

`CASES` is the one place that maps a case to its tests (pytest node ids; a node without
parameters stands for all of its parametrizations). The script runs pytest once over
the selected nodes with a JUnit XML report and prints a Markdown table, one row per
case: `pass (N tests)`, or `FAIL` with the first failing test and its message, or
`not run` (slow tests under --fast, a skip with its reason). Exit status 0 when no case
failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    tests: tuple[str, ...]


CASES = (
    Case(
        "broken shards",
        "a shard cut off mid-member, an empty file, a tar without members, a member that is no image: "
        "readable records labeled, the rest counted in the shard's json and the manifest, a warning "
        "names the shard; a rerun does not retry it",
        (
            "tests/test_broken_shards.py::test_broken_shards_are_labeled_as_far_as_they_read_and_counted",
            "tests/test_broken_shards.py::test_a_rerun_takes_broken_shards_as_final",
            "tests/test_shards.py::test_a_cut_off_shard_yields_its_whole_records_then_names_the_lost_one",
            "tests/test_shards.py::test_a_file_that_is_no_tar_raises_shard_read_error",
            "tests/test_shards.py::test_a_tar_without_members_has_no_records",
            "tests/test_shards.py::test_a_cut_off_gzip_shard_raises_shard_read_error",
        ),
    ),
    Case(
        "Ctrl-C (SIGINT to the group)",
        "exit within 10 s, one line, no process left (server, fork server, loader workers); rerun resumes",
        (
            "tests/test_interrupt.py::test_sigint_in_student_stops_cleanly",
            "tests/test_interrupt.py::test_rerun_after_sigint_resumes",
            "tests/test_interrupt.py::test_sigint_while_the_run_starts_stops_cleanly",
        ),
    ),
    Case(
        "SIGTERM to the group",
        "the same as Ctrl-C",
        (
            "tests/test_interrupt.py::test_sigterm_in_teacher_stops_cleanly",
            "tests/test_interrupt.py::test_rerun_after_sigterm_resumes",
        ),
    ),
    Case(
        "SIGKILL mid-labeling",
        "only whole files under final names; the rerun labels just the unfinished shards",
        ("tests/test_resume.py::test_killed_labeling_resumes_with_the_unfinished_shards",),
    ),
    Case(
        "NaN or inf loss",
        "one error naming the step and the loss parts; last good checkpoint intact; a rerun with a lower "
        "lr resumes from it",
        (
            "tests/test_divergence.py::test_nan_loss_names_the_step_and_the_loss_parts",
            "tests/test_divergence.py::test_last_good_checkpoint_stays_intact",
            "tests/test_divergence.py::test_rerun_with_a_lower_lr_resumes_from_the_last_good_checkpoint",
            "tests/test_divergence.py::test_non_finite_weights_are_never_checkpointed",
            "tests/test_divergence.py::test_non_finite_gradient_norm_stops_before_the_update",
            "tests/test_divergence.py::test_launch_raises_a_ranks_divergence_as_it_is",
            "tests/test_divergence.py::test_diverged_teacher_stage_resumes_after_a_lower_lr",
        ),
    ),
    Case(
        "disk full: checkpoint or manifest",
        "a clear error naming the file, no partial file under a final name; a rerun after space is freed "
        "completes (tmpfs, and simulated ENOSPC)",
        (
            "tests/test_disk_full.py::test_checkpoint_on_a_full_disk",
            "tests/test_disk_full.py::test_manifest_on_a_full_disk",
            "tests/test_disk_full.py::test_enospc_on_fsync_keeps_the_older_file",
            "tests/test_disk_full.py::test_enospc_inside_torch_save_is_a_disk_full_error",
            "tests/test_disk_full.py::test_cli_reports_a_full_disk_in_one_line",
        ),
    ),
    Case(
        "disk full: shard",
        "the stage fails naming the sidecar and the full disk, no partial or temporary file; completes "
        "once space is freed; not retried",
        (
            "tests/test_labeling_faults.py::test_a_full_disk_while_writing_a_sidecar",
            "tests/test_resume.py::test_a_failed_attempt_is_retried_in_place_and_a_full_disk_is_not",
        ),
    ),
    Case(
        "two runs on one run directory",
        "the second refuses at once naming pid and host; a killed run's lock is taken over",
        (
            "tests/test_runlock.py::test_second_run_refuses_at_once_naming_the_holder",
            "tests/test_runlock.py::test_lock_of_a_killed_run_is_taken_over",
            "tests/test_runlock.py::test_cli_run_refuses_a_held_run_directory_before_any_stage",
            "tests/test_runlock.py::test_stage_flows_hold_the_run_directory",
        ),
    ),
    Case(
        "Dask worker killed mid-shard",
        "the shard is retried (bounded), the run completes, the failed attempt's temporary files removed",
        ("tests/test_dask_runner.py::test_a_worker_killed_mid_shard",),
    ),
    Case(
        "leftover temporary files",
        "the .labels-*.tmp files of a killed labeling run are removed by the next run",
        ("tests/test_resume.py::test_leftover_temporary_files_are_removed_by_the_next_run",),
    ),
    Case(
        "bad config values",
        "every validation error names the key's path and the bad value",
        (
            "tests/test_config.py::test_every_validation_error_names_its_key_and_value",
            "tests/test_config.py::test_unknown_key_names_its_path_and_the_allowed_keys",
            "tests/test_config.py::test_bad_value_names_the_value",
            "tests/test_config.py::test_family_and_data_format_must_match",
        ),
    ),
    Case(
        "missing inputs",
        "annotation files, image folders, VOC lists, shards: all named in one error before any stage",
        (
            "tests/test_inputs.py::test_every_missing_input_is_named_in_one_error",
            "tests/test_inputs.py::test_the_run_fails_before_any_stage",
            "tests/test_inputs.py::test_cli_names_all_missing_inputs_and_runs_nothing",
        ),
    ),
    Case(
        "broken or mismatched COCO json",
        "the file and the reason (unknown category id, missing image file, bbox not numbers); zero-area and "
        "out-of-image boxes dropped, counted, warned about",
        (
            "tests/test_coco_input.py::test_broken_json_names_the_file",
            "tests/test_coco_input.py::test_unknown_category_id_names_the_annotation_and_the_id",
            "tests/test_coco_input.py::test_unknown_image_id_is_named",
            "tests/test_coco_input.py::test_bbox_values_that_are_not_numbers_are_named",
            "tests/test_coco_input.py::test_missing_image_files_are_named",
            "tests/test_coco_input.py::test_zero_area_and_outside_boxes_are_dropped_and_counted",
        ),
    ),
    Case(
        "listening on loopback",
        "the temporary server, training rendezvous and the labeling LocalCluster (dashboards too) bind 127.0.0.1 only",
        (
            "tests/test_interrupt.py::test_run_listens_on_loopback_only",
            "tests/test_security.py::test_labeling_cluster_listens_on_loopback_only",
        ),
    ),
    Case(
        "shared server with a password",
        "PREFECT_SERVER_API_AUTH_STRING: a client with PREFECT_API_AUTH_STRING runs flows, one without it "
        "(or with a wrong one) is refused with one line",
        (
            "tests/test_security.py::test_requests_without_the_password_are_refused",
            "tests/test_security.py::test_a_client_with_the_auth_string_runs_flows",
            "tests/test_security.py::test_a_client_without_it_is_refused_with_a_clear_error",
        ),
    ),
    Case(
        "no secrets in outputs",
        "a secret in the environment ends up in no file of the run directory or of PREFECT_HOME "
        "(logs, artifacts, flow run records)",
        ("tests/test_interrupt.py::test_secrets_stay_out_of_the_run_and_of_prefect",),
    ),
)


def node_of(testcase: ET.Element) -> str:
    """The node id of a JUnit testcase, without its parameters."""
    path = testcase.get("classname", "").replace(".", "/") + ".py"
    return f"{path}::{testcase.get('name', '').split('[', 1)[0]}"


def run_pytest(nodes: list[str], fast: bool) -> dict[str, list[tuple[str, str, str]]]:
    """node id -> [(test name, outcome, message)] for every testcase pytest ran."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *nodes]
        if fast:
            cmd += ["-m", "not slow"]
        subprocess.run(cmd, cwd=ROOT, check=False)
        if not xml.exists():
            sys.exit("pytest wrote no report")
        results: dict[str, list[tuple[str, str, str]]] = {}
        for tc in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                if (el := tc.find(tag)) is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    message = (el.get("message") or el.text or "").strip().splitlines()[0][:200]
                    break
            results.setdefault(node_of(tc), []).append((tc.get("name", ""), outcome, message))
        return results


def observed(case: Case, results: dict[str, list[tuple[str, str, str]]], fast: bool) -> str:
    ran = [r for node in case.tests for r in results.get(node, [])]
    failed = [r for r in ran if r[1] == "failed"]
    if failed:
        name, _, message = failed[0]
        return f"FAIL: {name}: {message}" + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")
    passed = [r for r in ran if r[1] == "passed"]
    skipped = [r for r in ran if r[1] == "skipped"]
    missing = [node for node in case.tests if node not in results]
    if not passed:
        if skipped:
            return f"not run: skipped ({skipped[0][2]})"
        return "not run (slow; drop --fast)" if fast else "not run: no such test " + ", ".join(missing)
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} skipped: {skipped[0][2]}")
    if missing:
        notes.append(f"{len(missing)} not run" + (" (slow)" if fast else f": {', '.join(missing)}"))
    return f"pass ({len(passed)} tests)" + (f"; {'; '.join(notes)}" if notes else "")


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| case | expected | observed |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="leave out the tests marked slow")
    parser.add_argument("--list", action="store_true", help="print the cases and their tests, run nothing")
    parser.add_argument("--case", default=None, help="only the cases whose name contains this text")
    args = parser.parse_args()
    cases = [c for c in CASES if args.case is None or args.case.lower() in c.name.lower()]
    if not cases:
        sys.exit(f"no case matches {args.case!r}; cases: {', '.join(c.name for c in CASES)}")
    if args.list:
        print(table([(c.name, c.expected, "<br>".join(c.tests)) for c in cases]))
        return 0
    results = run_pytest(sorted({t for c in cases for t in c.tests}), args.fast)
    rows = [(c.name, c.expected, observed(c, results, args.fast)) for c in cases]
    print()
    print(table(rows))
    return 1 if any(r[2].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
