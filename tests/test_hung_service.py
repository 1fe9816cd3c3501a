"""A hung service is cut off by the reload timeout, reported, and never leaves a half-activated state."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import MODEL, write_config

pytestmark = pytest.mark.heavy  # runs the real CLI and the serving stand-in as subprocesses

BOTH = ("--endpoints", "mac-dev")


def test_a_frozen_service_times_out_and_the_links_are_restored(workspace):
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    ws.config.write_text(ws.config.read_text().replace("reload_timeout_s: 10", "reload_timeout_s: 1"))
    server = ws.start_server("mac-dev")
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH, check=0)
    first = ws.active("mac-dev")
    ws.new_adapter(MODEL, "run2", seed=2)
    os.kill(server.pid, signal.SIGSTOP)  # alive (its pid checks out) but answering nothing
    try:
        started = time.monotonic()
        proc = ws.cli("deploy", "--cycle", "2", "--models", MODEL, *BOTH)
        took = time.monotonic() - started
    finally:
        os.kill(server.pid, signal.SIGCONT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the rollback's reload cannot be confirmed either: said plainly
    assert "did not confirm the reload within 1 s" in out and "ROLLBACK ALSO FAILED" in out
    assert took < 30  # bounded by the timeouts, not hanging
    # never half-activated: the links point where they pointed before the deploy
    assert ws.active("mac-dev") == first
    assert ws.status_json("mac-dev")["models"][MODEL]["health_status"] == "rollback_failed"
    # once the service runs again it serves what `active` names: the old release
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = json.loads((ws.endpoints["mac-dev"].parent / "run" / "loaded.json").read_text())
        if report.get("seq", 0) > 2 and report["version_id"] == first:
            break
        time.sleep(0.1)
    assert report["version_id"] == first and report["ok"] is True
