"""Identity, not liveness: a service that reports the new version but still holds the old bytes
(caching by path, like stock mlx_lm.server) is caught by the sha check and rolled back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODEL, write_config

from adapterctl.demo import stop_process

pytestmark = pytest.mark.heavy  # runs the real CLI and a serving process as subprocesses

STALE = Path(__file__).parent / "data" / "e2e_stale_server.py"


def wait_for_report(run: Path, server: subprocess.Popen) -> None:
    """Wait until `server` wrote loaded.json: it resolved `active` and holds those bytes from now on."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if json.loads((run / "loaded.json").read_text())["pid"] == server.pid:
                return
        except (FileNotFoundError, ValueError):
            pass
        assert server.poll() is None, f"the stale server exited with {server.returncode}"
        assert time.monotonic() < deadline, "the stale server never wrote loaded.json"
        time.sleep(0.05)


def test_a_reload_that_reports_the_new_version_with_stale_bytes_is_rolled_back(workspace):
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    run = ws.endpoints["mac-dev"].parent / "run"
    run.mkdir(parents=True, exist_ok=True)
    ws.endpoints["mac-dev"].mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, str(STALE), str(ws.endpoints["mac-dev"]), MODEL, str(run / "serve.pid")],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_report(run, server)
        # cycle 1: the service had nothing loaded, so its (stale) sha is null: accepted as no claim
        ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "mac-dev", check=0)
        stop_process(server)
        server = subprocess.Popen(
            [sys.executable, str(STALE), str(ws.endpoints["mac-dev"]), MODEL, str(run / "serve.pid")],
            stdin=subprocess.DEVNULL,
        )
        wait_for_report(run, server)  # it has loaded cycle 1's bytes and will keep them
        first = ws.active("mac-dev")
        ws.new_adapter(MODEL, "run2", seed=2)
        proc = ws.cli("deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 5 and "it did not load these bytes" in out, out
        assert ws.active("mac-dev") == first
        assert ws.status_json("mac-dev")["models"][MODEL]["last_failed_version"] != first
    finally:
        stop_process(server)
