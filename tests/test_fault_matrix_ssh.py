"""The fault-injection matrix over SSH (issue 11 item 9), and the faults only a network has.

1. The deploy and rollback matrices of tests/test_fault_matrix.py (kill -9 adapterctl at every step
   boundary, check the invariants, rerun the same command, check that it converges) against the real
   sshd hosts of tests/sshhosts.py: mac-1 (BSD userland; its service is the serving stand-in, reloaded
   by SIGUSR1 through the SSH agent, so every reload is confirmed by loaded.json) and linux-1
   (reload_method none).
2. The SSH link cut mid-transfer (the sshd serving adapterctl's connections killed while rsync sends a
   32 MiB adapter): a clear error naming the host, and a rerun that resumes.
3. The remote disk full mid-transfer on the BSD host, then space freed: the rerun converges (linux-2's
   variant is test_ssh.py::test_remote_disk_full_mid_transfer_fails_clearly_cleans_staging_and_keeps_active).
4. The serving process killed at the reload: never `active` at an unverified release marked
   "verifying"; once the service is back, reruns converge.

Each matrix is printed as a markdown table (pytest -s); the results are kept in docs/fault-matrix.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import MODEL
from sshhosts import descendants
from test_fault_matrix import (
    _active_complete,
    _converged,
    _deploy_matrix,
    _parse_all,
    _print_matrix,
    _rollback_matrix,
)
from test_ssh import (  # noqa: F401 - ssh_workspace and tmpfs are fixtures
    combined,
    deploy,
    deploy_argv,
    release_ok,
    ssh_workspace,
    staged_bytes,
    tmpfs,
    wait_for,
    write_ssh_config,
)

from adapterctl import endpoint_ops

pytestmark = pytest.mark.heavy

HOSTS = ("mac-1", "linux-1")


# -- the workspace: two SSH endpoints, mac-1's service reloaded by SIGUSR1 ---------------------------
def _configure(ws, sigusr1: bool = False) -> None:
    """Only mac-1 and linux-1 in the config; with `sigusr1`, mac-1 reloads the serving stand-in."""
    write_ssh_config(ws.root, {a: str(ws.endpoints[a]) for a in HOSTS})
    if not sigusr1:
        return
    text = ws.config.read_text()
    block = f'    adapter_dir: "{ws.endpoints["mac-1"]}"\n    kind: mlx\n    reload_method: none\n'
    assert block in text
    pidfile = ws.endpoints["mac-1"].parent / "run" / "serve.pid"
    sigusr1_lines = f'reload_method: sigusr1\n    pidfile: "{pidfile}"\n    reload_timeout_s: 10\n'
    live = block.replace("reload_method: none\n", sigusr1_lines)
    ws.config.write_text(text.replace(block, live))


def _loaded(ws, endpoint: str):
    """The stand-in's loaded.json for mac-1 (its reloads are confirmed); None for linux-1."""
    return ws.endpoints[endpoint].parent / "run" / "loaded.json" if endpoint == "mac-1" else None


@pytest.fixture
def ssh_live(ssh_workspace):  # noqa: F811 - the fixture imported from test_ssh
    """Both hosts at cycle 1; the serving stand-in of mac-1 runs on this machine (the hosts share its
    filesystem and pids: the agent's SIGUSR1 over SSH reaches it)."""
    ws = ssh_workspace
    _configure(ws, sigusr1=True)
    ws.endpoints["mac-1"].mkdir(parents=True)
    ws.start_server("mac-1")
    try:
        deploy(ws, 1, *HOSTS, models=[MODEL], check=0)
        assert json.loads(_loaded(ws, "mac-1").read_text())["version_id"] == ws.vid(1)
        yield ws
    finally:
        ws.stop_servers()  # (the conftest workspace stops only its own servers)


# -- 1. the matrices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", HOSTS)
def test_kill_at_every_step_of_an_ssh_deploy_then_rerun_converges(ssh_live, endpoint):
    ws = ssh_live
    how = "BSD userland, SIGUSR1 service" if endpoint == "mac-1" else "Linux, reload none"
    _deploy_matrix(ws, endpoint, _loaded(ws, endpoint), f"deploy × ssh ({endpoint}, {how})")


@pytest.mark.parametrize("endpoint", HOSTS)
def test_kill_at_every_step_of_an_ssh_rollback_then_rerun_completes_it(ssh_live, endpoint):
    ws = ssh_live
    ws.new_adapter(MODEL, "run2", seed=2)
    deploy(ws, 2, endpoint, models=[MODEL], check=0)
    how = "BSD userland, SIGUSR1 service" if endpoint == "mac-1" else "Linux, reload none"
    _rollback_matrix(ws, endpoint, _loaded(ws, endpoint), f"rollback × ssh ({endpoint}, {how})")


# -- 2. the link cut mid-transfer ----------------------------------------------------------------------
def _local_rsync(cli: subprocess.Popen) -> int | None:
    """The rsync sender the CLI started (its child, on this machine), if it runs yet."""
    for pid in descendants(cli.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"rsync":
            return pid
    return None


@pytest.mark.parametrize("endpoint", HOSTS)
def test_ssh_link_cut_mid_transfer_fails_naming_the_host_and_the_rerun_resumes(
    ssh_workspace,  # noqa: F811 - the fixture imported from test_ssh
    endpoint,
):
    """The sshd processes serving adapterctl's connections to the host are SIGKILLed while rsync sends a
    32 MiB adapter (the sender is paused at a quarter, so the cut lands mid-transfer however fast the
    loopback is): the command fails clearly, `active` is untouched, and the rerun sends only the rest."""
    ws = ssh_workspace
    _configure(ws)
    deploy(ws, 1, endpoint, models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=131072)  # 32 MiB of weights
    argv = deploy_argv(2, (endpoint,), [MODEL])
    total = ws.cli_json(*argv, "--dry-run", check=0)["bytes_to_send"]
    assert total > 16 * 1024 * 1024, total
    staging = ws.model_dir(endpoint) / "staging"
    cli = ws.popen(*argv)
    rsync, paused = None, False
    try:
        wait_for("rsync started", lambda: _local_rsync(cli) is not None, cli)
        rsync = _local_rsync(cli)
        wait_for("a quarter of the adapter arrived", lambda: staged_bytes(staging) > total // 4, cli)
        os.kill(rsync, signal.SIGSTOP)
        paused = True
        arrived = staged_bytes(staging)
        assert arrived < total, "the transfer had finished before the cut"
        victims = ws.hosts.kill_connections(endpoint)  # every sshd child serving adapterctl: link gone
        assert victims
        os.kill(rsync, signal.SIGCONT)
        paused = False
        out, err = cli.communicate(timeout=120)
    finally:
        if paused:
            with contextlib.suppress(OSError):
                os.kill(rsync, signal.SIGCONT)
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    text = out + err
    assert cli.returncode == 1, text
    assert "Traceback" not in text and "internal error" not in text, text
    said = [line for line in text.splitlines() if "lost the SSH connection" in line and "FAILED in" in line]
    assert said, text
    # one line: which endpoint and host, which phase, what happened, what to do
    assert said[0].startswith(f"[{endpoint}] {MODEL}: FAILED in transfer: endpoint {endpoint} "), said
    assert "rerun the same command and the transfer resumes" in said[0], said
    v2 = ws.vid(2)
    assert _active_complete(ws.endpoints[endpoint]) == v1
    assert not ws.release(endpoint, v2).exists()
    _parse_all(ws)

    rerun = ws.cli_json(*argv, check=0)
    [o] = rerun["outcomes"]
    assert o["status"] == "success", o
    _converged(ws, endpoint, v2, None)
    release_ok(ws, endpoint, v2)
    print(f"\nlink cut × {endpoint}: cut at {arrived} of {total} bytes; rerun sent {o['bytes_sent']} bytes")
    print(f"exit {cli.returncode}: {said[0]}")
    assert o["bytes_sent"] < total, (o["bytes_sent"], total, arrived)


# -- 3. the disk full mid-transfer, on the BSD host ----------------------------------------------------
def test_remote_disk_full_mid_transfer_on_the_bsd_host_then_space_freed_the_rerun_converges(
    ssh_workspace,  # noqa: F811 - the fixtures imported from test_ssh
    tmpfs,  # noqa: F811
):
    ws = ssh_workspace
    _configure(ws)
    adapter_dir = tmpfs(ws.endpoints["mac-1"], "1m")
    deploy(ws, 1, "mac-1", models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=16384)  # 2 MiB of weights on a 1 MiB disk
    proc = ws.cli_faulted("no-space-check", *deploy_argv(2, ("mac-1",), [MODEL]))
    text = combined(proc)
    assert proc.returncode == 1, text
    assert "No space left" in text and "disk is full" in text and "Traceback" not in text, text
    v2 = ws.vid(2)
    assert _active_complete(adapter_dir) == v1
    assert not ws.staging("mac-1", v2).exists()
    assert endpoint_ops.journal_open(str(adapter_dir)) is None
    _parse_all(ws)
    # the space comes back: the same command converges
    remount = subprocess.run(
        ["mount", "-o", "remount,size=64m", str(adapter_dir)], capture_output=True, text=True
    )
    assert remount.returncode == 0, remount.stderr
    deploy(ws, 2, "mac-1", models=[MODEL], check=0)
    _converged(ws, "mac-1", v2, None)
    release_ok(ws, "mac-1", v2)
    rows = [("no-space-check", "transfer/transfer", "yes (exit 1, then 0)")]
    _print_matrix("disk full × ssh (mac-1)", rows)


# -- 4. the service killed at the reload ----------------------------------------------------------------
def test_service_killed_at_the_reload_never_leaves_an_unverified_active_and_converges_once_back(ssh_live):
    """adapterctl is killed right before the reload (active already swapped to v2), then the service
    dies too. The rerun cannot reload anything: it must fail cleanly, v1 restored, never "verifying"
    (observed: exit 1, status rollback_failed, the journal left open for the next command). Once the
    service runs again, the first rerun finishes that rollback (observed: exit 5, v2 not retried in the
    same command) and the next converges on v2 (exit 0)."""
    ws = ssh_live
    endpoint, adir = "mac-1", ssh_live.endpoints["mac-1"]
    loaded = _loaded(ws, endpoint)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2)
    argv = deploy_argv(2, (endpoint,), [MODEL])
    plan = ws.cli_json(*argv, "--dry-run", check=0)
    [reload] = [i for i, s in enumerate(plan["steps"]) if s["action"] == "reload"]
    killed = ws.cli_faulted(f"{reload}:before", *argv)
    assert killed.returncode == -9, combined(killed)
    v2 = ws.vid(2)
    assert _active_complete(adir) == v2, "killed before the reload, after the swap"
    [server] = ws.servers
    server.kill()  # the service dies as adapterctl reaches its reload
    server.wait()
    ws.servers.clear()

    rows = []
    again = ws.cli(*argv)
    text = combined(again)
    assert again.returncode in (1, 5), text
    assert "Traceback" not in text and "internal error" not in text, text
    status = ws.status_json(endpoint)["models"][MODEL]
    now = _active_complete(adir)
    health = status["health_status"]
    print(f"\nservice dead, rerun: exit {again.returncode}; active {now}; status {health}\n{text}")
    assert "verifying" not in status["health_status"], status
    assert now == v1, "the rerun must restore v1 (exit 5, or exit 1 with the rollback's reload failed)"
    assert health in ("rolled_back", "rollback_failed"), status
    rows.append(
        (
            "service dead, rerun",
            f"exit {again.returncode}, active {'v1' if now == v1 else now}, {status['health_status']}",
            "no (as required: nothing to reload)",
        )
    )
    _parse_all(ws)

    # the service comes back (its old loaded.json removed, so "started" means it reported again)
    loaded.unlink()
    ws.start_server(endpoint)
    runs = 0
    while True:
        runs += 1
        proc = ws.cli(*argv)
        assert proc.returncode in (0, 5), combined(proc)
        got = f"exit {proc.returncode}, active {'v2' if ws.active(endpoint) == v2 else 'v1'}"
        rows.append((f"service back, rerun {runs}", got, "yes" if proc.returncode == 0 else "no"))
        if proc.returncode == 0:
            break
        assert runs < 2, combined(proc)
    _converged(ws, endpoint, v2, loaded)
    _print_matrix("service killed at the reload × ssh (mac-1)", rows)
