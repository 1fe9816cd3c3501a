"""reload_method sigusr1: signal the serving process (adapterctl.serving's helper reloads between
requests), then wait for its loaded.json to report the version (no outage)."""

from __future__ import annotations

from dataclasses import dataclass

from adapterctl.identity import iso, utc_now
from adapterctl.reload.base import ReloadDriver, ReloadIO, Trigger


@dataclass(frozen=True)
class Sigusr1(ReloadDriver):
    method = "sigusr1"
    signals_process = True
    confirmable: bool = True  # the service wrote a loaded.json when the plan was made

    def describe(self, version: str | None) -> str:
        confirm = (
            f"wait ≤ {self.timeout_s:g} s for loaded.json to report {version or 'no adapter'}"
            if self.confirmable
            else "the service writes no loaded.json: reload cannot be confirmed"
        )
        return f"reload: SIGUSR1 to the pid in {self.pidfile}; {confirm}; outage 0 s"

    def trigger(self, io: ReloadIO) -> Trigger:
        path, before = self.read_report(io)
        pid = io.transport.call("signal_pidfile", pidfile=self.pidfile)
        io.status_update({"last_reload": iso(utc_now())})
        return Trigger(before, path, pid=pid, command=f"SIGUSR1 to pid {pid}")

    def confirm(self, io: ReloadIO, trig: Trigger, expect: str | None) -> None:
        why = self.unconfirmable(io, trig.before)
        if why:
            io.say(f"{trig.command} ({why}: reload of {io.model} not confirmed)")
            return
        now = self.await_report(
            io, trig, ("seq", "loaded_at"), expect, f"pid {trig.pid} did not confirm the reload"
        )
        io.say(f"pid {now.get('pid', trig.pid)} confirmed it loaded {expect or 'no adapter'}")
