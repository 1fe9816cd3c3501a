"""reload_method none: the service re-reads `active` by itself; nothing to trigger or confirm."""

from __future__ import annotations

from dataclasses import dataclass

from adapterctl.reload.base import ReloadDriver, ReloadIO, Trigger


@dataclass(frozen=True)
class NoReload(ReloadDriver):
    method = "none"

    def describe(self, version: str | None) -> str:
        return "reload: none configured (the service re-reads `active` on its own); outage 0 s"

    def trigger(self, io: ReloadIO) -> Trigger:
        return Trigger(None, None)
