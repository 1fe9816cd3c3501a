"""A stand-in `systemctl` for the tests: it really stops and starts processes.

Installed by the tests as an executable named `systemctl` first on PATH. Units are JSON files
in $FAKE_SYSTEMD_DIR, one per unit, `{UNIT}.json`:

    {"argv": ["python", "-m", "adapterctl.serving", ...], "pidfile": "/…/serve.pid", "log": "/…/unit.log"}

Commands (like systemd's exit codes):
    systemctl start UNIT      start argv detached unless the pid in the pidfile runs; exit 0
    systemctl stop UNIT       SIGTERM the pid in the pidfile, wait until it is gone; exit 0
    systemctl restart UNIT    stop, then start, then wait until the new pid is in the pidfile; exit 0
    systemctl is-active UNIT  exit 0 "active" when the pid runs, else 3 "inactive"
    an unknown unit           exit 5 "Unit UNIT not found."

Every invocation is appended to $FAKE_SYSTEMD_DIR/calls.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 15.0


def read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running(pid: int | None) -> bool:
    """Alive and not a zombie (an exited child nobody reaped yet still answers kill(pid, 0))."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(unit: dict) -> None:
    pid = read_pid(unit["pidfile"])
    if not running(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def start(unit: dict) -> int:
    if running(read_pid(unit["pidfile"])):
        return 0
    log = open(unit.get("log") or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        unit["argv"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # detached: it outlives this command, like a service
        close_fds=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while read_pid(unit["pidfile"]) != proc.pid:
        if proc.poll() is not None:
            print(f"Job for unit failed: the process exited with {proc.returncode}.", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print("Job for unit timed out: no pidfile.", file=sys.stderr)
            return 1
        time.sleep(0.02)
    return 0


def main(argv: list[str]) -> int:
    registry = os.environ.get("FAKE_SYSTEMD_DIR")
    if not registry:
        print("fake systemctl: FAKE_SYSTEMD_DIR is not set", file=sys.stderr)
        return 1
    with open(os.path.join(registry, "calls.log"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    if len(argv) != 2 or argv[0] not in ("start", "stop", "restart", "is-active"):
        print(f"fake systemctl: unsupported arguments {argv}", file=sys.stderr)
        return 1
    command, name = argv
    try:
        with open(os.path.join(registry, name + ".json")) as f:
            unit = json.load(f)
    except FileNotFoundError:
        print(f"Failed to {command} {name}: Unit {name} not found.", file=sys.stderr)
        return 5
    if command == "is-active":
        alive = running(read_pid(unit["pidfile"]))
        print("active" if alive else "inactive")
        return 0 if alive else 3
    if command in ("stop", "restart"):
        stop(unit)
    if command in ("start", "restart"):
        return start(unit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
