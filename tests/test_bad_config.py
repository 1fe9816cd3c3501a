"""A table of bad configs and argument combinations (issue 12, item 4), each through the real CLI.

Every row must exit 2 with one `error:` line (plus an optional `  → hint`) that contains its fragment,
and leave the workspace (config, store, both endpoint trees) byte-for-byte as it was. Rows that need
a registered version register one first; the digest is taken after that setup.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from conftest import MODEL, TRANSLATOR, assert_one_line_error, tree_digest

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

MAC_DIR = "./endpoints/mac dev é/adapters"
RTX_DIR = "./endpoints/rtx-1 ü/adapters"
COMMAND_LINE = f"      command: {TRANSLATOR!r}\n".replace("'", '"')
DEPLOY = ("deploy", "--cycle", "1", "--models", MODEL)
BOTH = ("--endpoints", "mac-dev", "rtx-1")


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    fragments: tuple[str, ...]
    edits: dict[str, str] = field(default_factory=dict)  # config text replacements
    register: bool = False  # register gemma_4b cycle 1 first: argv may use {vid} and {typo}
    env_config: str | None = None  # $ADAPTERCTL_CONFIG for this row (default: the workspace config)
    exit_code: int = 2


def _command(argv: list[str], extra: str = "") -> dict[str, str]:
    new = f"      command: {argv!r}\n".replace("'", '"') + extra
    return {COMMAND_LINE: new}


ROWS = [
    # -- which config: never a silent fallback to ./adapterctl.yaml (there is one in cwd) ---------
    Row("config-flag-empty", ("--config", "", "status"), ("--config is empty",)),
    Row("config-flag-blank", ("--config", "  ", *DEPLOY, *BOTH), ("--config is empty",)),
    Row("config-flag-missing", ("--config", "nope.yaml", "status"), ("nope.yaml", "does not exist")),
    Row("config-flag-directory", ("--config", "endpoints", "status"), ("endpoints", "is a directory")),
    Row("config-env-empty", ("status",), ("$ADAPTERCTL_CONFIG is empty",), env_config=""),
    Row(
        "config-env-missing",
        ("status",),
        ("gone.yaml", "$ADAPTERCTL_CONFIG"),
        env_config="gone.yaml",
    ),
    # -- an adapter_dir whose parent does not exist is never created ----------------------------
    Row(
        "adapter-dir-parent-typo",
        (*DEPLOY, *BOTH),
        ("endpoint mac-dev", "mac dev e", "does not exist"),
        edits={MAC_DIR: "./endpoints/mac dev e/adapters"},
    ),
    Row(
        "adapter-dir-parent-missing-dry-run",
        (*DEPLOY, "--endpoints", "rtx-1", "--dry-run"),
        ("endpoint rtx-1", "never created"),
        edits={RTX_DIR: "./endpoints/new box/rtx/adapters"},
    ),
    Row(
        "adapter-dir-parents-both-named",
        (*DEPLOY, "--endpoints", "all"),
        ("endpoint mac-dev", "endpoint rtx-1"),
        edits={MAC_DIR: "./x/a/adapters", RTX_DIR: "./y/b/adapters"},
    ),
    # -- a health program that cannot run here is a config error, found before registration -----
    Row(
        "health-program-not-on-path",
        (*DEPLOY, *BOTH),
        ("models.gemma_4b.health.command", "'no-such-translator'", "not found on PATH"),
        edits=_command(["no-such-translator", "{release}"]),
    ),
    Row(
        "health-program-absolute-missing",
        (*DEPLOY, "--endpoints", "rtx-1"),
        ("'/nonexistent/bin/translate'", "not an executable file", "endpoint rtx-1"),
        edits=_command(["/nonexistent/bin/translate", "{release}"]),
    ),
    Row(
        "health-program-relative-missing",
        (*DEPLOY, "--endpoints", "mac-dev"),
        ("'./translate.sh'", "not an executable file"),
        edits=_command(["./translate.sh", "{release}"]),
    ),
    Row(
        "health-program-not-on-its-env-path",
        (*DEPLOY, "--endpoints", "mac-dev"),
        ("'python3'", "not found on PATH"),
        edits=_command(["python3", "t.py"], "      env: {PATH: /nonexistent}\n"),
    ),
    Row(
        "health-program-missing-dry-run",
        (*DEPLOY, *BOTH, "--dry-run"),
        ("not found on PATH",),
        edits=_command(["translate-v2", "{release}"]),
    ),
    # -- contradictions and typos in the config file (file:line) ----------------------------------
    Row(
        "suite-none-with-command",
        ("status",),
        ("adapterctl.yaml:", "models.gemma_4b.health.command", "suite is 'none'"),
        edits={"      suite: translation_en_es\n": "      suite: none\n"},
    ),
    Row(
        "health-key-typo",
        ("status",),
        ("adapterctl.yaml:", "unknown key 'comand'", "did you mean 'command'"),
        edits={"      command:": "      comand:"},
    ),
    # -- option combinations that cannot mean anything --------------------------------------------
    Row(
        "cycle-with-version",
        (*DEPLOY, "--version", "{vid}", *BOTH),
        ("--cycle and --version",),
        register=True,
    ),
    Row(
        "all-adapters-with-models",
        ("deploy", "--cycle", "1", "--all-adapters", "--models", MODEL, *BOTH),
        ("--all-adapters and --models",),
    ),
    Row(
        "deploy-parallel-zero", (*DEPLOY, *BOTH, "--parallel", "0"), ("--parallel must be at least 1, got 0",)
    ),
    Row("rollback-parallel-negative", ("rollback", *BOTH, "--parallel", "-2"), ("--parallel", "got -2")),
    Row("log-limit-negative", ("log", "--limit", "-1"), ("--limit", "got -1")),
    Row(
        "deploy-cycle-negative", ("deploy", "--cycle", "-5", "--models", MODEL, *BOTH), ("invalid cycle -5",)
    ),
    Row("register-cycle-negative", ("register", "--model", MODEL, "--cycle", "-1"), ("invalid cycle -1",)),
    # -- unknown names: a did-you-mean in every command -----------------------------------------
    Row(
        "deploy-model-typo",
        ("deploy", "--cycle", "1", "--models", "gemma_4", *BOTH),
        ("did you mean 'gemma_4b'",),
    ),
    Row("deploy-endpoint-typo", (*DEPLOY, "--endpoints", "mac-deb"), ("did you mean 'mac-dev'",)),
    Row(
        "deploy-canary-typo",
        (*DEPLOY, *BOTH, "--canary", "rtx-2"),
        ("--canary rtx-2", "did you mean 'rtx-1'"),
    ),
    Row(
        "deploy-version-typo",
        ("deploy", "--version", "{typo}", *BOTH),
        ("{typo} is not registered", "did you mean '{vid}'"),
        register=True,
    ),
    Row(
        "rollback-to-unknown-version",
        ("rollback", *BOTH, "--to", "{typo}"),
        ("--to {typo}", "did you mean '{vid}'"),
        register=True,
    ),
    Row(
        "rollback-to-typo",
        ("rollback", *BOTH, "--to", "prev"),
        ("invalid version id 'prev'", "did you mean 'previous'"),
    ),
    Row("rollback-model-typo", ("rollback", *BOTH, "--models", "whispr"), ("did you mean 'whisper'",)),
    Row("status-endpoint-typo", ("status", "--endpoints", "rtx1"), ("did you mean 'rtx-1'",)),
    Row("doctor-endpoint-typo", ("doctor", "--endpoints", "mac_dev"), ("did you mean 'mac-dev'",)),
    Row("gc-endpoint-typo", ("gc", "--endpoints", "rtx-l"), ("did you mean 'rtx-1'",)),
    Row("log-endpoint-typo", ("log", "--endpoint", "mac-deb"), ("did you mean 'mac-dev'",)),
    Row(
        "register-model-typo", ("register", "--model", "whispr", "--cycle", "1"), ("did you mean 'whisper'",)
    ),
    Row("convert-model-typo", ("convert", "--models", "gema_4b", "--dry-run"), ("did you mean 'gemma_4b'",)),
]


def test_the_table_covers_at_least_25_bad_inputs():
    assert len(ROWS) >= 25 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_config_or_arguments_are_refused_in_one_line_and_nothing_changes(workspace, row):
    ws = workspace
    text = ws.config.read_text(encoding="utf-8")
    for old, new in row.edits.items():
        assert old in text, f"{row.id}: {old!r} is not in the config"
        text = text.replace(old, new)
    ws.config.write_text(text, encoding="utf-8")
    names: dict[str, str] = {}
    if row.register:
        vid = ws.cli("register", "--model", MODEL, "--cycle", "1", check=0).stdout.strip()
        names = {"vid": vid, "typo": vid[:-1] + ("0" if vid[-1] != "0" else "1")}
    argv = [a.format(**names) for a in row.argv]
    digest = tree_digest(ws.root)
    if row.env_config is not None:
        ws.config = row.env_config  # Workspace.cli_env passes str(ws.config) as $ADAPTERCTL_CONFIG
    proc = ws.cli(*argv)
    assert proc.returncode == row.exit_code
    assert_one_line_error(proc, *(f.format(**names) for f in row.fragments))
    assert tree_digest(ws.root) == digest, f"{row.id}: the workspace changed"


def test_a_first_deploy_creates_adapter_dir_when_its_parent_exists(workspace):
    """The counterpart of the parent rows: only adapter_dir itself is ever created."""
    ws = workspace
    assert not ws.endpoints["rtx-1"].exists() and ws.endpoints["rtx-1"].parent.is_dir()
    ws.cli(*DEPLOY, "--endpoints", "rtx-1", check=0)
    assert ws.active("rtx-1") is not None


def test_ssh_endpoint_whose_adapter_dir_parent_is_missing_is_refused_naming_the_host(workspace, ssh_hosts):
    ws = workspace
    ws.env.update(ssh_hosts.env())
    missing = ssh_hosts.hosts["linux-1"].root / f"t-{uuid.uuid4().hex[:12]}" / "typo"
    old = 'host: local\n    adapter_dir: "./endpoints/rtx-1 ü/adapters"'
    text = ws.config.read_text(encoding="utf-8")
    assert old in text
    ws.config.write_text(text.replace(old, f'host: linux-1\n    adapter_dir: "{missing}/adapters"'), "utf-8")
    digest = tree_digest(ws.root)
    proc = ws.cli("--ssh-config", str(ssh_hosts.ssh_config), *DEPLOY, "--endpoints", "rtx-1")
    assert_one_line_error(proc, "endpoint rtx-1", f"{missing} of adapter_dir", "on linux-1")
    assert f"mkdir -p {missing} on linux-1" in proc.stderr
    assert not missing.exists() and not missing.parent.exists()
    assert tree_digest(ws.root) == digest
