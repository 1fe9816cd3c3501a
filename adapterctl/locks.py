"""The endpoint lock (STYLE: git's index.lock): who holds it, written atomically; what is wrong with a
lock file that names nobody; and breaking one, logged."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from adapterctl.config import EndpointConfig
from adapterctl.errors import LockHeld
from adapterctl.facts import LockFacts
from adapterctl.identity import Identity, iso
from adapterctl.transports.base import Transport


def _facts(raw: dict[str, Any]) -> LockFacts:
    return LockFacts.parse(raw)


def holder(identity: Identity, deployment_id: str, command: str, now: datetime) -> dict[str, Any]:
    """What a lock records about who took it."""
    return {
        "user": identity.user,
        "host": identity.host,
        "pid": identity.pid,
        "deployment_id": deployment_id,
        "started_at": iso(now),
        "command": command,
    }


def holder_dead(lock: LockFacts, identity: Identity) -> bool:
    """A lock whose holder process ran on this machine and is gone."""
    from adapterctl.endpoint_ops import pid_alive

    h = lock.holder or {}
    return (
        lock.state == "held"
        and h.get("host") == identity.host
        and isinstance(h.get("pid"), int)
        and not pid_alive(h["pid"])
    )


def acquire(
    tr: Transport,
    ep: EndpointConfig,
    holder: dict[str, Any],
    identity: Identity,
    break_lock: bool,
    stale_after_s: float,
    say: Callable[[str], None],
    log: Callable[[dict[str, Any]], None],
) -> None:
    """Take the endpoint lock. A lock left by a dead process of this machine is broken by itself;
    `break_lock` breaks any other (held, empty, garbage or binary), and both are logged.

    Raises LockHeld naming the holder, or what is wrong with the lock file, and the fix.
    """
    path = f"{ep.adapter_dir}/.adapterctl.lock"
    got = tr.call("lock_acquire", adapter_dir=ep.adapter_dir, holder=holder)
    if got["acquired"]:
        return
    lock = _facts(got["lock"])
    dead = holder_dead(lock, identity)
    if dead or break_lock:
        h = lock.holder or {}
        why = (
            f"its holder pid {h.get('pid')} on {h.get('host')} is gone"
            if dead
            else f"--break-lock was given ({lock.describe(path)})"
        )
        say(f"breaking the lock of deployment {h.get('deployment_id') or '(none recorded)'}: {why}")
        got = tr.call("lock_acquire", adapter_dir=ep.adapter_dir, holder=holder, break_sha=lock.raw_sha)
        if got["acquired"]:
            log(
                {
                    "action": "break_lock",
                    "endpoint": ep.name,
                    "status": "success",
                    "broken_holder": lock.holder,
                    "broken_state": lock.state,
                    "broken_by": f"{identity.user}@{identity.host} pid {identity.pid}",
                    "reason": why,
                }
            )
            return
        lock = _facts(got["lock"])
    if lock.state == "held":
        stale = (
            f"; it is older than lock_stale_after_s ({stale_after_s:g} s)"
            if lock.age_s > stale_after_s
            else ""
        )
        hint = f"wait for it to finish{stale}; if that command is gone, rerun with --break-lock"
    else:
        hint = (
            "no adapterctl command can have written that (locks are written whole): if none is running "
            "against this endpoint, rerun with --break-lock"
        )
    raise LockHeld(f"endpoint {ep.name}: {lock.describe(path)}", hint)


def release(tr: Transport, ep: EndpointConfig, deployment_id: str) -> bool:
    return bool(tr.call("lock_release", adapter_dir=ep.adapter_dir, deployment_id=deployment_id))
