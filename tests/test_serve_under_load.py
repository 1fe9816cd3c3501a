"""During real deploys and rollbacks (SIGUSR1 reloads), a bounded load loop against the reference
server on 127.0.0.1 sees zero failed requests."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import MODEL, write_config
from test_serve import start_server

from adapterctl.demo import stop_process

pytestmark = pytest.mark.heavy  # runs `adapterctl serve` and the real CLI as subprocesses

MAX_REQUESTS = 20000  # bounded in count and in time
MAX_SECONDS = 60


def test_zero_failed_requests_across_deploys_and_rollbacks(workspace):
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    run = ws.endpoints["mac-dev"].parent / "run"  # the config's pidfile is ../run/serve.pid
    ws.endpoints["mac-dev"].mkdir(parents=True, exist_ok=True)
    served = start_server(ws.endpoints["mac-dev"], run)
    stats = {"requests": 0, "failed": 0, "longest_ms": 0.0, "errors": []}
    stop = threading.Event()
    try:

        def load() -> None:
            end = time.monotonic() + MAX_SECONDS
            while not stop.is_set() and stats["requests"] < MAX_REQUESTS and time.monotonic() < end:
                started = time.perf_counter()
                try:
                    status, body = served.chat("Amen.", timeout=10)
                    if status != 200 or not body["choices"][0]["message"]["content"]:
                        raise ValueError(f"HTTP {status}: {body}")
                except Exception as exc:  # any failure counts
                    stats["failed"] += 1
                    stats["errors"].append(repr(exc))
                stats["requests"] += 1
                stats["longest_ms"] = max(stats["longest_ms"], (time.perf_counter() - started) * 1000)

        loader = threading.Thread(target=load)
        loader.start()
        ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "mac-dev", check=0)
        ws.new_adapter(MODEL, "run2", seed=2)
        ws.cli("deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev", check=0)
        ws.cli("rollback", "-e", "mac-dev", "-m", MODEL, check=0)
        ws.cli("rollback", "-e", "mac-dev", "-m", MODEL, check=0)
        stop.set()
        loader.join(timeout=MAX_SECONDS + 15)
        print(
            f"\nload loop: {stats['requests']} requests, {stats['failed']} failed, "
            f"longest {stats['longest_ms']:.1f} ms"
        )
        assert stats["requests"] > 50
        assert stats["failed"] == 0, stats["errors"][:5]
        report = json.loads(served.loaded.read_text())
        assert report["seq"] >= 5  # its start plus four confirmed reloads, all while the loop ran
        assert report["version_id"] == ws.active("mac-dev")
    finally:
        stop.set()
        stop_process(served.proc)
