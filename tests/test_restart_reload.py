"""reload_method restart and rollback --to base, end to end with real processes.

The serving stand-in (`python -m adapterctl.serving`) runs as a "unit" of a fake `systemctl`
(tests/data/fake_systemctl.py, first on the CLI's PATH) that really SIGTERMs it and starts a
new process. No mocks: every confirmation comes from the new process's own loaded.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODEL, assert_one_line_error, tree_digest

from adapterctl import endpoint_ops

pytestmark = pytest.mark.heavy  # runs the real CLI and serving processes as subprocesses

FAKE_SYSTEMCTL = Path(__file__).parent / "data" / "fake_systemctl.py"
UNIT = "adapterctl-serve"
MAC = ("--endpoints", "mac-dev", "--models", MODEL)
CONSENT = "--allow-outage"


class Service:
    """The serving stand-in for mac-dev, managed by the fake systemctl."""

    def __init__(self, ws, tmp: Path):
        self.ws = ws
        self.bin = tmp / "bin"
        self.units = tmp / "systemd"
        self.run = ws.endpoints["mac-dev"].parent / "run"
        self.bin.mkdir()
        self.units.mkdir()
        self.run.mkdir(parents=True)
        systemctl = self.bin / "systemctl"
        systemctl.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SYSTEMCTL}" "$@"\n')
        systemctl.chmod(0o755)
        unit = {
            "argv": [
                sys.executable,
                "-m",
                "adapterctl.serving",
                "--adapter-dir",
                str(ws.endpoints["mac-dev"]),
                "--model",
                MODEL,
                "--pidfile",
                str(self.run / "serve.pid"),
                "--log",
                str(self.run / "serve.log"),
            ],
            "pidfile": str(self.run / "serve.pid"),
            "log": str(tmp / "unit.log"),
        }
        (self.units / f"{UNIT}.json").write_text(json.dumps(unit))
        ws.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_SYSTEMD_DIR=str(self.units)
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / "systemctl"), *args], env=self.ws.cli_env(), capture_output=True, text=True
        )

    def start(self) -> dict:
        assert self.systemctl("start", UNIT).returncode == 0
        return self.wait_loaded(lambda rec: True)

    def stop(self) -> None:
        self.systemctl("stop", UNIT)

    def loaded(self) -> dict:
        return json.loads((self.run / "loaded.json").read_text())

    def wait_loaded(self, pred, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rec = self.loaded()
                if pred(rec):
                    return rec
            except (FileNotFoundError, ValueError):
                pass
            assert time.monotonic() < deadline, "the service never reported"
            time.sleep(0.05)

    def pid(self) -> int:
        return int((self.run / "serve.pid").read_text())

    def restarts(self) -> list[list[str]]:
        calls = self.units / "calls.log"
        lines = calls.read_text().splitlines() if calls.exists() else []
        return [c for c in map(json.loads, lines) if c[0] == "restart"]


def configure(ws, *, unit: str = UNIT, allow_outage: bool = False) -> None:
    """mac-dev: reload_method restart of `unit`, pidfile (and loaded.json) in ../run."""
    text = ws.config.read_text(encoding="utf-8")
    start = text.index("  mac-dev:")
    end = text.index("    reload_timeout_s:", start)
    block = text[start:end]
    lines = [
        ln
        for ln in block.splitlines(keepends=True)
        if not ln.lstrip().startswith(("reload_method:", "unit:", "pidfile:", "allow_outage:"))
    ]
    lines.append(f"    reload_method: restart\n    unit: {unit}\n    pidfile: ../run/serve.pid\n")
    if allow_outage:
        lines.append("    allow_outage: true\n")
    ws.config.write_text(text[:start] + "".join(lines) + text[end:], encoding="utf-8")


def vid(ws, cycle: int) -> str:
    manifest = json.loads((ws.store / "manifest.json").read_text())
    [found] = [v["version_id"] for v in manifest["versions"][MODEL] if v["cycle"] == cycle]
    return found


@pytest.fixture
def service(workspace, tmp_path):
    configure(workspace)
    svc = Service(workspace, tmp_path)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_dry_run_says_restart_outage_and_that_it_needs_consent(workspace, service):
    ws = workspace
    proc = ws.cli("deploy", "--cycle", "1", *MAC, "--dry-run", check=0)
    plan = proc.stdout + proc.stderr
    assert f"systemctl restart {UNIT}; expected outage 10–20 s" in plan
    assert "needs --allow-outage" in plan
    proc = ws.cli("deploy", "--cycle", "1", *MAC, "--dry-run", CONSENT, check=0)
    plan = proc.stdout + proc.stderr
    assert f"systemctl restart {UNIT}; expected outage 10–20 s" in plan
    assert "needs --allow-outage" not in plan
    assert service.restarts() == []


def test_restart_deploy_refused_without_consent_then_restarts_the_service(workspace, service):
    ws = workspace
    first = service.loaded()
    assert first["version_id"] is None  # no adapter deployed yet: the base model
    before = tree_digest(ws.root)
    proc = ws.cli("deploy", "--cycle", "1", *MAC)
    assert_one_line_error(proc, "mac-dev", "restart", "outage")
    assert CONSENT in proc.stderr
    assert tree_digest(ws.root) == before  # nothing written: not even the version step ran
    assert not (ws.store / "manifest.json").exists()
    assert service.restarts() == []

    ws.cli("deploy", "--cycle", "1", *MAC, CONSENT, check=0)
    c1 = vid(ws, 1)
    now = service.loaded()
    assert now["pid"] != first["pid"] and now["pid"] == service.pid()  # a new process
    assert (now["version_id"], now["ok"]) == (c1, True)
    assert ws.active("mac-dev") == c1
    status = ws.status_json("mac-dev")["models"][MODEL]
    assert (status["health_status"], status["last_good_version"]) == ("healthy", c1)
    assert service.restarts() == [["restart", UNIT]]

    # a second cycle: restarted again, confirmed by yet another process
    ws.new_adapter(MODEL, "run2", seed=2)
    proc = ws.cli("deploy", "--cycle", "2", *MAC, CONSENT, check=0)
    c2 = vid(ws, 2)
    again = service.loaded()
    assert again["pid"] not in (first["pid"], now["pid"])
    assert again["version_id"] == c2
    assert (ws.active("mac-dev"), ws.previous("mac-dev")) == (c2, c1)
    assert "confirmed it loaded" in proc.stderr
    assert len(service.restarts()) == 2


def test_unknown_unit_fails_activation_and_rolls_back_while_the_old_process_serves(workspace, service):
    ws = workspace
    configure(ws, allow_outage=True)  # consent from the config: no flag needed
    ws.cli("deploy", "--cycle", "1", *MAC, check=0)
    c1 = vid(ws, 1)
    serving = service.loaded()
    assert serving["version_id"] == c1

    configure(ws, unit="ghost.service", allow_outage=True)
    ws.new_adapter(MODEL, "run2", seed=2)
    proc = ws.cli("deploy", "--cycle", "2", *MAC)
    assert proc.returncode == 5, proc.stderr
    assert "ghost.service" in proc.stderr and "Unit ghost.service not found" in proc.stderr
    assert ws.active("mac-dev") == c1  # swapped back
    after = service.loaded()
    assert (after["pid"], after["seq"], after["version_id"]) == (
        serving["pid"],
        serving["seq"],
        c1,
    )  # never stopped: the old process still serves c1, and no second (failing) restart ran
    assert "still serves" in proc.stderr
    status = ws.status_json("mac-dev")["models"][MODEL]
    assert status["health_status"] == "rolled_back" and status["active_version"] == c1
    assert [r["status"] for r in ws.log() if r.get("action") == "deploy"][-1] == "rolled_back"


def test_rollback_to_base_serves_no_adapter_and_previous_returns_to_it(workspace, service):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", *MAC, CONSENT, check=0)
    c1 = vid(ws, 1)
    with_adapter = service.loaded()

    before = tree_digest(ws.root)
    proc = ws.cli("rollback", *MAC, "--to", "base")
    assert_one_line_error(proc, "restart")
    assert tree_digest(ws.root) == before

    dry = ws.cli("rollback", *MAC, "--to", "base", "--dry-run", check=0)
    assert "active → (base model, no adapter)" in dry.stdout
    assert "health suite not applicable" in dry.stdout

    proc = ws.cli("rollback", *MAC, "--to", "base", CONSENT, check=0)
    base = service.loaded()
    assert base["pid"] != with_adapter["pid"]
    assert (base["version_id"], base["sha256"], base["ok"]) == (None, None, True)
    assert ws.active("mac-dev") is None
    assert not os.path.lexists(ws.endpoints["mac-dev"] / MODEL / "active")
    assert ws.previous("mac-dev") == c1
    status = ws.status_json("mac-dev")["models"][MODEL]
    assert status["active_version"] is None and status["previous_version"] == c1
    assert status["health_status"] == "base_model"
    assert status["last_good_version"] == c1  # base is no verified release
    assert "base model: health suite not applicable" in proc.stderr

    again = ws.cli("rollback", *MAC, "--to", "base", CONSENT)
    assert_one_line_error(again, "already serves the base model")

    ws.cli("rollback", *MAC, "--to", "previous", CONSENT, check=0)
    back = service.loaded()
    assert back["pid"] not in (with_adapter["pid"], base["pid"])
    assert (back["version_id"], back["ok"]) == (c1, True)
    assert ws.active("mac-dev") == c1
    assert ws.status_json("mac-dev")["models"][MODEL]["health_status"] == "healthy"


def test_rollback_to_base_without_a_service_manager(workspace):
    """reload_method none: `base` only removes `active` (the service re-reads it on its own)."""
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--endpoints", "rtx-1", "--models", MODEL, check=0)
    c1 = vid(ws, 1)
    ws.cli("rollback", "--endpoints", "rtx-1", "--to", "base", check=0)
    assert (ws.active("rtx-1"), ws.previous("rtx-1")) == (None, c1)
    ws.cli("rollback", "--endpoints", "rtx-1", "--to", "previous", check=0)
    assert (ws.active("rtx-1"), ws.previous("rtx-1")) == (c1, None)


def test_restart_command_per_platform_and_a_missing_manager():
    uid = os.getuid()
    assert endpoint_ops.restart_argv("adapterctl-serve", "systemctl") == [
        "systemctl",
        "restart",
        "adapterctl-serve",
    ]
    assert endpoint_ops.restart_argv("com.adapterctl.serve", "launchctl") == [
        "launchctl",
        "kickstart",
        "-k",
        f"gui/{uid}/com.adapterctl.serve",
    ]
    assert endpoint_ops.restart_argv("system/com.adapterctl.serve", "launchctl")[-1] == (
        "system/com.adapterctl.serve"
    )
    with pytest.raises(endpoint_ops.OpError):
        endpoint_ops.restart_argv("-H evil", "systemctl")
    if shutil.which("launchctl") is None:
        res = endpoint_ops.restart_service("com.adapterctl.serve", "launchctl", timeout_s=5)
        assert res["rc"] == 127 and "not found" in res["stderr"]
