"""Identity, not liveness: a service that reports the new version but still holds the old bytes
(caching by path, like stock mlx_lm.server) is caught by the sha check and rolled back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import MODEL, write_config

from adapterctl.demo import stop_process

STALE = Path(__file__).parent / "data" / "e2e_stale_server.py"


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
        deadline = time.monotonic() + 10
        while not (run / "loaded.json").exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        # cycle 1: the service had nothing loaded, so its (stale) sha is null: accepted as no claim
        ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "mac-dev", check=0)
        stop_process(server)
        server = subprocess.Popen(
            [sys.executable, str(STALE), str(ws.endpoints["mac-dev"]), MODEL, str(run / "serve.pid")],
            stdin=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # it loads cycle 1's bytes and will keep them
        first = ws.active("mac-dev")
        ws.new_adapter(MODEL, "run2", seed=2)
        proc = ws.cli("deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 5 and "it did not load these bytes" in out, out
        assert ws.active("mac-dev") == first
        assert ws.status_json("mac-dev")["models"][MODEL]["last_failed_version"] != first
    finally:
        stop_process(server)
