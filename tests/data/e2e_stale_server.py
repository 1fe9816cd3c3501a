"""A serving process that caches by path (like stock mlx_lm.server): on SIGUSR1 it reports the
version `active` now names, but keeps serving the bytes it loaded first: its sha256 stays stale.

usage: e2e_stale_server.py ADAPTER_DIR MODEL PIDFILE
"""

import json
import os
import signal
import sys
import time

from adapterctl.endpoint_ops import atomic_write_bytes
from adapterctl.serving import resolve_active

adapter_dir, model, pidfile = sys.argv[1:4]
first = resolve_active(adapter_dir, model)
state = {"seq": 0, "pending": True}


def report() -> None:
    now = resolve_active(adapter_dir, model)
    state["seq"] += 1
    record = {
        "model": model,
        "version_id": now and now["version_id"],
        "sha256": first and first["sha256"],
        "pid": os.getpid(),
        "seq": state["seq"],
        "ok": True,
        "loaded_at": time.time(),
    }
    loaded = os.path.join(os.path.dirname(pidfile), "loaded.json")
    atomic_write_bytes(loaded, (json.dumps(record) + "\n").encode())


signal.signal(signal.SIGUSR1, lambda *a: state.update(pending=True))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
atomic_write_bytes(pidfile, f"{os.getpid()}\n".encode())
while True:
    if state["pending"]:
        state["pending"] = False
        report()
    time.sleep(0.05)
