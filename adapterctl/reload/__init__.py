"""Reload drivers: how a service is made to load what `active` points at, and how that is confirmed.

One driver per `reload_method` (none, sigusr1, systemd, launchd), all with one protocol (base.py):
`trigger()` then `confirm()`, each bounded by the endpoint's reload_timeout_s. The planner picks the
driver once, from the config and the endpoint's facts; steps hold it, and `--dry-run` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterctl.reload.base import ReloadDriver, ReloadIO, Trigger
from adapterctl.reload.none import NoReload
from adapterctl.reload.service import Launchd, Systemd
from adapterctl.reload.sigusr1 import Sigusr1

__all__ = ["ReloadDriver", "ReloadIO", "Trigger", "NoReload", "Sigusr1", "Systemd", "Launchd", "driver_for"]


def driver_for(ep: Any, platform: str, loaded: Mapping[str, Any] | None, allow_outage: bool) -> ReloadDriver:
    """The driver of endpoint config `ep`, given the endpoint's platform and whether its service reports."""
    confirmable = loaded is not None
    if ep.reload_method == "none":
        return NoReload(ep.reload_timeout_s)
    if ep.reload_method == "sigusr1":
        return Sigusr1(ep.reload_timeout_s, ep.pidfile, confirmable)
    consent = ep.reload_method != "restart" or allow_outage or ep.allow_outage
    cls = Launchd if platform == "darwin" else Systemd
    return cls(ep.reload_timeout_s, ep.pidfile, confirmable, ep.unit, consent)
