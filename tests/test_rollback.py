"""End to end: `adapterctl rollback` on local endpoints, with real links, logs and a real server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import MODEL, tree_digest, write_config

import adapterctl

pytestmark = pytest.mark.heavy  # runs the real CLI and the serving stand-in as subprocesses

BOTH = ("--endpoints", "mac-dev", "rtx-1")
GEMMA = ("--models", MODEL)
LIVE_FAILS = [sys.executable, str(Path(__file__).parent / "data" / "e2e_live_fails.py"), "{release}"]


def deploy_cycles(ws, cycles, *, zero_b: tuple[int, ...] = ()) -> list[str]:
    """Deploy gemma_4b cycle after cycle to both endpoints; returns the version ids in order."""
    for cycle in cycles:
        if cycle > 1:
            ws.new_adapter(MODEL, f"run{cycle}", seed=cycle, zero_b=cycle in zero_b)
        ws.cli("deploy", "--cycle", str(cycle), *GEMMA, *BOTH, check=4 if cycle in zero_b else 0)
    return [vid(ws, c) for c in cycles]


def vid(ws, cycle: int) -> str:
    manifest = json.loads((ws.store / "manifest.json").read_text())
    [found] = [v["version_id"] for v in manifest["versions"][MODEL] if v["cycle"] == cycle]
    return found


def links(ws) -> dict[str, tuple[str | None, str | None]]:
    return {e: (ws.active(e), ws.previous(e)) for e in ("mac-dev", "rtx-1")}


def release_dir(ws, endpoint: str, version: str) -> Path:
    return ws.endpoints[endpoint] / MODEL / "releases" / version


def compat_link(ws) -> Path:
    return ws.endpoints["mac-dev"].parent / "fine_tuned_gemma_mi_A"


def rollback_lines(ws) -> list[dict]:
    return [r for r in ws.log() if r.get("action") == "rollback"]


def test_rollback_twice_returns_to_where_it_started(workspace):
    ws = workspace
    c1, c2 = deploy_cycles(ws, (1, 2))
    start = links(ws)
    assert start == {"mac-dev": (c2, c1), "rtx-1": (c2, c1)}
    ws.cli("rollback", *BOTH, check=0)
    assert links(ws) == {"mac-dev": (c1, c2), "rtx-1": (c1, c2)}
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", c1))
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.status_json(endpoint)["models"][MODEL]["active_version"] == c1
    ws.cli("rollback", *BOTH, check=0)
    assert links(ws) == start
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", c2))
    # and each rollback was logged, one line per endpoint
    lines = rollback_lines(ws)
    assert sorted((r["endpoint"], r["version"]) for r in lines) == [
        ("mac-dev", c1),
        ("mac-dev", c2),
        ("rtx-1", c1),
        ("rtx-1", c2),
    ]
    assert len({r["deployment_id"] for r in lines}) == 2
    for r in lines:
        assert r["models"] == [MODEL]
        assert r["status"] == "success"
        assert r["adapterctl_version"] == adapterctl.__version__
        assert "user" in r and "duration_s" in r and "phases_completed" in r
        assert r["health_check_results"]["post_activation"]["all_passed"] is True


def test_rollback_to_an_older_version_skips_the_previous_one(workspace):
    ws = workspace
    c1, _c2, c3 = deploy_cycles(ws, (1, 2, 3))
    ws.cli("rollback", *BOTH, *GEMMA, "--to", c1, check=0)
    assert links(ws) == {"mac-dev": (c1, c3), "rtx-1": (c1, c3)}
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", c1))


def test_rollback_to_last_good_leaves_a_release_that_never_passed(workspace):
    ws = workspace
    c1, c2 = deploy_cycles(ws, (1, 2), zero_b=(2,))  # c2 is published but failed its health check
    ws.cli("rollback", *BOTH, *GEMMA, "--to", c2, check=1)  # the live check fails: reported, not undone
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.active(endpoint) == c2
        status = ws.status_json(endpoint)["models"][MODEL]
        assert status["health_status"] == "unhealthy" and status["last_good_version"] == c1
    ws.cli("rollback", *BOTH, *GEMMA, "--to", "last-good", check=0)
    assert links(ws) == {"mac-dev": (c1, c2), "rtx-1": (c1, c2)}
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.status_json(endpoint)["models"][MODEL]["health_status"] == "healthy"


def test_rollback_with_no_previous_release_exits_2_naming_the_releases_there(workspace):
    ws = workspace
    [c1] = deploy_cycles(ws, (1,))
    before = tree_digest(ws.root / "endpoints")
    result = ws.cli("rollback", *BOTH, *GEMMA, check=2)
    assert c1 in result.stderr
    assert "previous" in result.stderr
    assert tree_digest(ws.root / "endpoints") == before
    assert rollback_lines(ws) == []


def test_rollback_dry_run_changes_nothing_and_shows_its_plan(workspace):
    ws = workspace
    c1, c2 = deploy_cycles(ws, (1, 2))
    before = tree_digest(ws.root)
    text = ws.cli("rollback", *BOTH, *GEMMA, "--dry-run", check=0)
    plan = ws.cli_json("rollback", *BOTH, *GEMMA, "--dry-run", check=0)
    assert tree_digest(ws.root) == before
    assert "DRY RUN" in text.stdout
    swaps = [s for s in plan["steps"] if s["action"] == "swap"]
    assert {(s["endpoint"], s["version"]) for s in swaps} == {("mac-dev", c1), ("rtx-1", c1)}
    for step in plan["steps"]:
        assert step["summary"] in text.stdout, step
    assert links(ws) == {"mac-dev": (c2, c1), "rtx-1": (c2, c1)}


def test_rollback_reloads_the_serving_process_to_the_rolled_back_version(workspace):
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    ws.endpoints["mac-dev"].parent.mkdir(parents=True, exist_ok=True)
    server = ws.start_server("mac-dev")
    loaded_json = ws.endpoints["mac-dev"].parent / "run" / "loaded.json"
    c1, c2 = deploy_cycles(ws, (1, 2))
    assert json.loads(loaded_json.read_text())["version_id"] == c2
    ws.cli("rollback", *BOTH, *GEMMA, check=0)
    report = json.loads(loaded_json.read_text())
    assert report["ok"] is True and report["pid"] == server.pid
    assert report["version_id"] == c1
    assert ws.active("mac-dev") == c1


def test_automatic_rollback_returns_to_last_good_not_to_an_unverified_active(workspace):
    # DESIGN §7: automatic rollback goes to last-good, not blindly to the release that was active.
    ws = workspace
    c1, c2 = deploy_cycles(ws, (1, 2), zero_b=(2,))
    ws.cli("rollback", *BOTH, *GEMMA, "--to", c2, check=1)  # someone made the untested c2 live
    write_config(ws.root, health_command=LIVE_FAILS, extra_model=True)
    ws.new_adapter(MODEL, "run3", seed=3)
    ws.cli("deploy", "--cycle", "3", *GEMMA, *BOTH, check=5)
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.active(endpoint) == c1
        assert ws.status_json(endpoint)["models"][MODEL]["health_status"] == "rolled_back"
