"""Bad input from the command line or the config: one `error:` line (plus an optional `  → hint`),
exit 2, no traceback, and the workspace byte-for-byte unchanged. Also the endpoint list syntaxes,
rollback refusals and `--help`.

Everything runs the real CLI (`ws.cli`) as a subprocess against a real workspace.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import MODEL, assert_one_line_error, tree_digest

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess


def refused(ws, *args: str, needles=(), anywhere=()) -> str:
    """Run the CLI; it must fail as a one-line usage error and change nothing. Returns stderr."""
    digest = tree_digest(ws.root)
    proc = ws.cli(*args)
    assert_one_line_error(proc, *needles)
    for needle in anywhere:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"
    assert tree_digest(ws.root) == digest, "the workspace changed"
    return proc.stderr


def register(ws, model: str = MODEL, cycle: int = 1) -> str:
    return ws.cli("register", "--model", model, "--cycle", str(cycle), check=0).stdout.strip()


DEPLOY = ["deploy", "--cycle", "1"]


# --- unknown or unsafe names -----------------------------------------------------------------


def test_unknown_model_in_models_is_named_with_the_known_models_exit_2_nothing_written(workspace):
    refused(
        workspace,
        *DEPLOY,
        "--models",
        "gemma_4",
        "--endpoints",
        "mac-dev",
        needles=["gemma_4"],
        anywhere=[MODEL, "whisper"],
    )


def test_unknown_endpoint_in_endpoints_is_named_with_the_known_endpoints_exit_2_nothing_written(workspace):
    refused(
        workspace,
        *DEPLOY,
        "--models",
        MODEL,
        "--endpoints",
        "mac-prod",
        needles=["mac-prod"],
        anywhere=["mac-dev", "rtx-1"],
    )


@pytest.mark.parametrize("name", ["../x", "gemma_4b/../whisper"])
def test_path_like_model_name_is_refused_exit_2_and_nothing_written(workspace, name):
    refused(workspace, *DEPLOY, "--models", name, "--endpoints", "mac-dev")


def test_path_like_model_name_in_register_is_refused_exit_2_and_nothing_written(workspace):
    refused(workspace, "register", "--model", "../gemma_4b", "--cycle", "1")


def test_unknown_endpoint_for_rollback_is_refused_exit_2(workspace):
    refused(workspace, "rollback", "--endpoints", "nowhere", needles=["nowhere"], anywhere=["mac-dev"])


# --- what to deploy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["cycle1", "cycle1_20260315_ABCDEF12"],
)
def test_malformed_version_id_is_refused_exit_2_and_nothing_written(workspace, bad):
    refused(workspace, "deploy", "--version", bad, "--endpoints", "mac-dev", "--dry-run")


def test_unknown_well_formed_version_id_is_refused_exit_2_and_nothing_written(workspace):
    refused(
        workspace,
        "deploy",
        "--version",
        "cycle9_20260101_0123abcd",
        "--endpoints",
        "mac-dev",
        needles=["cycle9_20260101_0123abcd"],
    )


def test_version_registered_for_another_model_is_refused_for_this_model(workspace):
    vid = register(workspace, model="whisper")
    refused(workspace, "deploy", "--version", vid, "--models", MODEL, "--endpoints", "mac-dev", needles=[vid])


def test_deploy_without_cycle_or_version_is_refused_exit_2_and_nothing_written(workspace):
    stderr = refused(workspace, "deploy", "--models", MODEL, "--endpoints", "mac-dev")
    assert "--cycle" in stderr and "--version" in stderr


def test_deploy_without_endpoints_is_refused_exit_2_and_nothing_written(workspace):
    stderr = refused(workspace, *DEPLOY, "--models", MODEL)
    assert "--endpoints" in stderr
    assert "mac-dev" in stderr and "rtx-1" in stderr  # says what could be chosen


def test_deploy_cycle_without_models_is_refused_exit_2_and_nothing_written(workspace):
    stderr = refused(workspace, *DEPLOY, "--endpoints", "mac-dev")
    assert "--models" in stderr


def test_endpoints_flag_with_no_value_is_refused_exit_2(workspace):
    refused(workspace, *DEPLOY, "--models", MODEL, "--endpoints", "--dry-run")


# --- the config file --------------------------------------------------------------------------


def _line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_yaml_with_a_tab_indent_names_the_file_and_line_exit_2(workspace):
    ws = workspace
    text = ws.config.read_text(encoding="utf-8")
    broken = text.replace("    kind: mlx\n", "\tkind: mlx\n", 1)
    ws.config.write_text(broken, encoding="utf-8")
    line = _line_of(broken, "\tkind: mlx")
    refused(ws, *DEPLOY, "--models", MODEL, "-e", "mac-dev", "--dry-run", needles=[f"{ws.config}:{line}"])


def test_yaml_with_an_unclosed_bracket_names_the_file_and_line_exit_2(workspace):
    ws = workspace
    text = ws.config.read_text(encoding="utf-8")
    broken = text.replace("keep_releases: 5\n", "keep_releases: [5\n", 1)
    ws.config.write_text(broken, encoding="utf-8")
    stderr = refused(ws, *DEPLOY, "--models", MODEL, "-e", "mac-dev")
    m = re.search(re.escape(str(ws.config)) + r":(\d+)", stderr)
    assert m, stderr
    assert int(m[1]) >= _line_of(broken, "keep_releases: [5")


def test_unknown_config_key_names_file_line_and_key_exit_2(workspace):
    ws = workspace
    text = ws.config.read_text(encoding="utf-8")
    broken = text.replace("    kind: gguf\n", "    kind: gguf\n    colour: blue\n", 1)
    ws.config.write_text(broken, encoding="utf-8")
    line = _line_of(broken, "colour: blue")
    refused(
        ws,
        *DEPLOY,
        "--models",
        MODEL,
        "-e",
        "mac-dev",
        needles=[f"{ws.config}:{line}:", "endpoints.rtx-1.colour", "colour"],
    )


def test_missing_config_file_given_by_flag_is_refused_exit_2(workspace):
    ws = workspace
    missing = ws.root / "nope.yaml"
    refused(ws, "--config", str(missing), "versions", needles=[str(missing)])


# --- endpoint list syntaxes ---------------------------------------------------------------------

BOTH = {"mac-dev", "rtx-1"}
ENDPOINT_SYNTAXES = {
    "space separated after one flag": ["--endpoints", "mac-dev", "rtx-1"],
    "space separated after -e": ["-e", "mac-dev", "rtx-1"],
    "comma separated": ["-e", "mac-dev,rtx-1"],
    "repeated flag": ["--endpoints", "mac-dev", "--endpoints", "rtx-1"],
    "all": ["--endpoints", "all"],
    "a name twice": ["--endpoints", "mac-dev", "rtx-1", "mac-dev"],
}


def test_endpoint_list_syntaxes_each_select_both_endpoints_in_the_dry_run_plan(workspace):
    ws = workspace
    digest = tree_digest(ws.root)
    procs = {  # concurrently: dry runs write nothing, and it keeps the suite fast
        name: ws.popen(*DEPLOY, "--models", MODEL, *sel, "--dry-run", "--json")
        for name, sel in ENDPOINT_SYNTAXES.items()
    }
    selected = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err}"
        plan = json.loads(out)
        assert plan["dry_run"] is True
        selected[name] = {s["endpoint"] for s in plan["steps"] if s["endpoint"]}
    assert selected == {name: BOTH for name in ENDPOINT_SYNTAXES}
    assert tree_digest(ws.root) == digest  # a dry run writes nothing


def test_space_separated_endpoints_before_other_options_keep_those_options(workspace):
    ws = workspace
    plan = ws.cli_json(
        "deploy", "--endpoints", "mac-dev", "rtx-1", "--models", MODEL, "--cycle", "4", "--dry-run", check=0
    )
    assert {s["endpoint"] for s in plan["steps"] if s["endpoint"]} == BOTH
    assert {s["model"] for s in plan["steps"] if s["model"]} == {MODEL}
    assert all(s["version"].startswith("cycle4_") for s in plan["steps"] if s["version"])


def test_space_separated_models_after_one_flag_select_both_models(workspace):
    plan = workspace.cli_json(*DEPLOY, "--models", MODEL, "whisper", "-e", "rtx-1", "--dry-run", check=0)
    assert {s["model"] for s in plan["steps"] if s["model"]} == {MODEL, "whisper"}


# --- rollback refusals --------------------------------------------------------------------------


def test_rollback_with_no_previous_release_is_refused_naming_the_releases_that_exist(workspace):
    ws = workspace
    ws.cli(*DEPLOY, "--models", MODEL, "--endpoints", "mac-dev", check=0)
    (vid,) = (
        v["version_id"] for v in json.loads((ws.store / "manifest.json").read_text())["versions"][MODEL]
    )
    assert ws.active("mac-dev") == vid and ws.previous("mac-dev") is None
    for args in (["--endpoints", "mac-dev"], ["--endpoints", "mac-dev", "--models", MODEL]):
        stderr = refused(ws, "rollback", *args, needles=["mac-dev"])
        assert vid in stderr  # names what exists there
    assert ws.active("mac-dev") == vid


def test_rollback_on_a_fresh_endpoint_is_refused_exit_2_and_nothing_written(workspace):
    stderr = refused(workspace, "rollback", "--endpoints", "rtx-1", "--models", MODEL, needles=["rtx-1"])
    assert "none" in stderr


@pytest.mark.parametrize("to", ["../x"])
def test_rollback_to_a_bad_target_is_refused_exit_2(workspace, to):
    refused(workspace, "rollback", "--endpoints", "mac-dev", "--to", to)


def test_rollback_without_endpoints_is_refused_exit_2(workspace):
    refused(workspace, "rollback", "--models", MODEL)


# --- help ---------------------------------------------------------------------------------------


def test_top_level_help_exits_0_and_documents_every_exit_code(workspace):
    proc = workspace.cli("--help", check=0)
    text = " ".join(proc.stdout.split())
    assert "Exit codes" in text
    for code, word in (
        (0, "success"),
        (1, "phase"),
        (2, "usage"),
        (3, "lock"),
        (4, "health"),
        (5, "rolled back"),
    ):
        assert re.search(rf"\b{code} [^0-9]*?{word}", text), (code, word, text)
    for command in ("deploy", "rollback", "status", "versions", "register"):
        assert command in text
    assert "--config" in text and "--debug" in text  # the global options


def test_deploy_help_exits_0_and_lists_its_options(workspace):
    proc = workspace.cli("deploy", "--help", check=0)
    text = proc.stdout
    for option in (
        "--cycle",
        "--version",
        "--models",
        "--endpoints",
        "--dry-run",
        "--json",
        "--all-adapters",
    ):
        assert option in text, option
    assert "Traceback" not in proc.stderr


def test_deploy_help_mentions_exit_codes(workspace):
    text = " ".join(workspace.cli("deploy", "--help", check=0).stdout.split())
    assert re.search(r"[Ee]xit codes?", text), text
