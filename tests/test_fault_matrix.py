"""The fault-injection matrix (issue 11): kill -9 adapterctl at every step boundary of a deploy and a
rollback, locally and over SSH, rerun the same command, and check that it converges.

A test-only hook (ADAPTERCTL_FAULT="<step index>:before|after", "c<j>:after" in a compensation,
"bytes:N" mid-transfer) makes the executor SIGKILL itself there. After each kill: `active` points at
a complete release, manifest/status/log parse. After the rerun: exit 0 (or 5 for a service that
fails verify), `active` is the intended release and the service reports it, status.json says
healthy (never "verifying"), the journal has nothing open, staging and temp files are gone.

The matrix is printed at the end of each test (run pytest with -s to see it) and kept in
docs/fault-matrix.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import MODEL, write_config

from adapterctl import endpoint_ops

pytestmark = pytest.mark.heavy


def _parse_all(ws) -> None:
    json.loads((ws.store / "manifest.json").read_text())
    for line in (ws.store / "deploy_log.jsonl").read_text().splitlines():
        json.loads(line)
    for adir in ws.endpoints.values():
        status = adir / "status.json"
        if status.exists():
            json.loads(status.read_text())


def _active_complete(adir: Path, model: str = MODEL) -> str | None:
    """The version `active` points at; asserts it is a complete release (or that there is none)."""
    link = adir / model / "active"
    if not os.path.lexists(link):
        return None
    target = os.readlink(link)
    assert (link.parent / target / "RELEASE.json").is_file(), f"active → {target} is not a complete release"
    return target.rsplit("/", 1)[-1]


def _converged(ws, endpoint: str, version: str, loaded: Path | None) -> None:
    adir = ws.endpoints[endpoint]
    assert _active_complete(adir) == version
    status = json.loads((adir / "status.json").read_text())["models"][MODEL]
    assert status["health_status"] == "healthy", status
    assert status["active_version"] == version
    assert endpoint_ops.journal_open(str(adir)) is None, "a transaction is still open"
    left = endpoint_ops.leftovers(str(adir), [MODEL])
    assert left == [], left
    if loaded is not None:
        assert json.loads(loaded.read_text())["version_id"] == version, "the service did not load it"
    rows = ws.cli_json("status", "--endpoints", endpoint, check=0)
    assert all("verifying" not in str(r.get("health_status")) for r in rows), rows


def _kill_points(plan: dict) -> list[str]:
    """Every boundary between steps: before the first, after each."""
    return ["0:before"] + [f"{i}:after" for i in range(len(plan["steps"]))]


def _print_matrix(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}\n| kill point | step | converged |\n|---|---|---|")
    for point, step, ok in rows:
        print(f"| {point} | {step} | {ok} |")


def _deploy_matrix(ws, endpoint: str, loaded: Path | None, title: str) -> None:
    rows = []
    cycle = 2
    argv = lambda c: ["deploy", "--cycle", str(c), "--models", MODEL, "--endpoints", endpoint]  # noqa: E731
    ws.new_adapter(MODEL, f"run{cycle}", seed=cycle)
    plan = ws.cli_json(*argv(cycle), "--dry-run", check=0)
    steps = [f"{s['phase']}/{s['action']}" for s in plan["steps"]]
    for point in _kill_points(plan):
        ws.new_adapter(MODEL, f"run{cycle}", seed=cycle)
        killed = ws.cli_faulted(point, *argv(cycle))
        assert killed.returncode == -9, f"{point}: exit {killed.returncode}\n{killed.stderr}"
        _active_complete(ws.endpoints[endpoint])
        _parse_all(ws)
        again = ws.cli(*argv(cycle))
        assert again.returncode == 0, f"rerun after kill at {point}: exit {again.returncode}\n{again.stderr}"
        version = json.loads((ws.store / "manifest.json").read_text())["versions"][MODEL][-1]["version_id"]
        try:
            _converged(ws, endpoint, version, loaded)
        except AssertionError as exc:
            raise AssertionError(f"after kill at {point} and rerun: {exc}\n{again.stderr}") from None
        index = int(point.split(":")[0])
        rows.append((point, steps[index], "yes"))
        cycle += 1
    _print_matrix(title, rows)


def _rollback_matrix(ws, endpoint: str, loaded: Path | None, title: str) -> None:
    rows = []
    argv = ["rollback", "--endpoints", endpoint, "--models", MODEL]
    plan = ws.cli_json(*argv, "--dry-run", check=0)
    steps = [f"{s['phase']}/{s['action']}" for s in plan["steps"]]
    for point in _kill_points(plan):
        adir = ws.endpoints[endpoint]
        want = os.readlink(adir / MODEL / "previous").rsplit("/", 1)[-1]
        killed = ws.cli_faulted(point, *argv)
        assert killed.returncode == -9, f"{point}: exit {killed.returncode}\n{killed.stderr}"
        now = _active_complete(adir)
        _parse_all(ws)
        if endpoint_ops.journal_open(str(adir)) is None and now == want:  # killed after it had finished:
            want = os.readlink(adir / MODEL / "previous").rsplit("/", 1)[-1]  # the rerun is a new rollback
        again = ws.cli(*argv)
        assert again.returncode == 0, f"rerun after kill at {point}: exit {again.returncode}\n{again.stderr}"
        try:
            _converged(ws, endpoint, want, loaded)  # the rollback completed, it did not flip back
        except AssertionError as exc:
            raise AssertionError(f"after kill at {point} and rerun: {exc}\n{again.stderr}") from None
        rows.append((point, steps[int(point.split(":")[0])], "yes"))
    _print_matrix(title, rows)


@pytest.fixture
def live_workspace(workspace):
    """mac-dev reloads by SIGUSR1 through the serving stand-in, which reports what it loaded."""
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    ws.start_server("mac-dev")
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    return ws


def test_kill_at_every_step_of_a_local_deploy_then_rerun_converges(live_workspace):
    ws = live_workspace
    loaded = ws.endpoints["mac-dev"].parent / "run" / "loaded.json"
    _deploy_matrix(ws, "mac-dev", loaded, "deploy × local (mac-dev, SIGUSR1 service)")


def test_kill_at_every_step_of_a_local_rollback_then_rerun_completes_it(live_workspace):
    ws = live_workspace
    ws.new_adapter(MODEL, "run2", seed=2)
    ws.cli("deploy", "--cycle", "2", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    loaded = ws.endpoints["mac-dev"].parent / "run" / "loaded.json"
    _rollback_matrix(ws, "mac-dev", loaded, "rollback × local (mac-dev, SIGUSR1 service)")


def test_kill_after_the_swap_with_a_service_that_fails_verify_rolls_back_on_rerun_exit_5(workspace):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    v1 = ws.active("rtx-1")
    ws.new_adapter(MODEL, "run2", seed=2)
    argv = ["deploy", "--cycle", "2", "--models", MODEL, "--endpoints", "rtx-1"]
    plan = ws.cli_json(*argv, "--dry-run", check=0)
    swap = next(i for i, s in enumerate(plan["steps"]) if s["action"] == "swap")
    killed = ws.cli_faulted(f"{swap}:after", *argv)
    assert killed.returncode == -9
    status = ws.cli("status", "--endpoints", "rtx-1", check=0).stdout
    assert "interrupted (swapped)" in status and "reload and verify it now" in status, status
    # the live check now fails: the translator answers in German for every input
    bad = ws.root / "german.py"
    bad.write_text("import sys\nfor line in sys.stdin:\n    print('Guten Morgen', flush=True)\n")
    cfg = ws.config.read_text().replace('"-m", "adapterctl.demo_translator", "{release}"', f'"{bad}"')
    ws.config.write_text(cfg)
    again = ws.cli(*argv)
    assert again.returncode == 5, again.stderr
    assert ws.active("rtx-1") == v1
    status = ws.status_json("rtx-1")["models"][MODEL]
    assert status["health_status"] == "rolled_back" and status["active_version"] == v1
    assert endpoint_ops.journal_open(str(ws.endpoints["rtx-1"])) is None


def test_kill_inside_the_compensation_is_finished_by_the_next_command(workspace):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    v1 = ws.active("rtx-1")
    bad = ws.root / "fail-after-swap.py"
    # passes the pre-activation check (staged release), fails on the live `active` link
    bad.write_text(
        "import sys\nlive = sys.argv[1].endswith('active')\nfor line in sys.stdin:\n"
        "    good = 'buenos dias servicio expiacion Santiago gracia fe amen'\n"
        "    print('nada' if live else good, flush=True)\n"
    )
    ws.config.write_text(
        ws.config.read_text().replace(
            '"-m", "adapterctl.demo_translator", "{release}"', f'"{bad}", "{{release}}"'
        )
    )
    rows = []
    for j, point in enumerate(["c0:after", "c1:after"]):
        ws.new_adapter(MODEL, f"run{j + 2}", seed=j + 2)
        argv = ["deploy", "--cycle", str(j + 2), "--models", MODEL, "--endpoints", "rtx-1"]
        killed = ws.cli_faulted(point, *argv)
        assert killed.returncode == -9, killed.stderr
        _active_complete(ws.endpoints["rtx-1"])
        again = ws.cli(*argv)
        assert again.returncode == 5, again.stderr
        assert ws.active("rtx-1") == v1
        assert endpoint_ops.journal_open(str(ws.endpoints["rtx-1"])) is None
        rows.append((point, "compensation", "yes (exit 5)"))
    _print_matrix("compensation × local", rows)


def test_a_transfer_killed_halfway_resumes_and_sends_about_the_missing_half(workspace):
    ws = workspace
    ws.new_adapter(MODEL, "run1", seed=1, hidden=131072)  # 32 MiB of weights
    argv = ["deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1"]
    plan = ws.cli_json(*argv, "--dry-run", check=0)
    total = plan["bytes_to_send"]
    killed = ws.cli_faulted(f"bytes:{total // 2}", *argv)
    assert killed.returncode == -9
    again = ws.cli_json(*argv, check=0)
    [o] = again["outcomes"]
    assert o["status"] == "success"
    assert o["bytes_sent"] <= total * 0.55, (o["bytes_sent"], total)
    print(f"\nkilled at {total // 2} of {total} bytes; the rerun sent {o['bytes_sent']}")
