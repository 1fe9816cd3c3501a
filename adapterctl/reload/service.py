"""reload_method restart: the service manager restarts the service (systemd on Linux, launchd on
macOS), an outage of 10–20 s that needs consent; the new process's loaded.json confirms it."""

from __future__ import annotations

from dataclasses import dataclass

from adapterctl.errors import PhaseError
from adapterctl.identity import iso, utc_now
from adapterctl.reload.base import ReloadDriver, ReloadIO, Trigger


@dataclass(frozen=True)
class _ServiceRestart(ReloadDriver):
    outage = "10–20 s"
    manager = "systemctl"
    confirmable: bool = True
    unit: str | None = None
    consent: bool = False

    @property
    def needs_consent(self) -> bool:
        return not self.consent

    def command(self) -> str:
        return f"systemctl restart {self.unit}"

    def describe(self, version: str | None) -> str:
        confirm = (
            f"wait ≤ {self.timeout_s:g} s for loaded.json (new pid) to report {version or 'no adapter'}"
            if self.confirmable
            else "no loaded.json beside the pidfile: restart not confirmed"
        )
        consent = "" if self.consent else "; needs --allow-outage (or allow_outage: true for this endpoint)"
        return f"reload: {self.command()}; expected outage {self.outage}; {confirm}{consent}"

    def trigger(self, io: ReloadIO) -> Trigger:
        path, before = self.read_report(io)
        res = io.transport.call(
            "restart_service", unit=self.unit, manager=self.manager, timeout_s=self.timeout_s
        )
        command = " ".join(res["argv"])
        io.status_update({"last_reload": iso(utc_now())})
        if res["rc"] != 0:
            tail = " ".join((res.get("stderr") or res.get("stdout") or "").strip().splitlines()[-3:])
            exit_text = "timed out" if res["rc"] is None else f"exit {res['rc']}"
            raise PhaseError(
                f"endpoint {io.endpoint}: `{command}` failed ({exit_text}) for unit {self.unit}: "
                f"{tail or 'no output'}",
                f"check the unit on the endpoint (`{res['argv'][0]} status {self.unit}` or its log)",
            )
        return Trigger(before, path, restarted=True, command=f"`{command}`")

    def confirm(self, io: ReloadIO, trig: Trigger, expect: str | None) -> None:
        """The restarted process has a new pid and counts `seq` from 1 again: a fresh report is one whose
        pid, seq or loaded_at differs from the one read before the restart."""
        why = self.unconfirmable(io, trig.before)
        if why:
            why = "no loaded.json beside the pidfile" if trig.before is None else why
            io.say(f"{trig.command} done ({why}): restart not confirmed")
            return
        now = self.await_report(
            io,
            trig,
            ("pid", "seq", "loaded_at"),
            expect,
            f"the restarted service ({self.unit}) did not report what it loaded",
        )
        io.say(
            f"{trig.command}: new pid {now.get('pid')} (was {(trig.before or {}).get('pid')}) "
            f"confirmed it loaded {expect or 'no adapter'}"
        )

    def still_serving(self, io: ReloadIO, forward_restarted: bool, version: str | None) -> bool:
        """When the forward restart never happened (e.g. an unknown unit), the old process may still be up
        serving `version`: then a rollback needs no restart (and no outage)."""
        path, report = self.read_report(io)
        if forward_restarted or path is None:
            return False
        report = report or {}
        state = io.transport.call("check_pidfile", pidfile=self.pidfile)
        if not (
            state["alive"]
            and report.get("pid") == state["pid"]
            and report.get("ok", True)
            and report.get("version_id") == version
        ):
            return False
        io.say(f"the service was not restarted: pid {state['pid']} still serves {version or 'no adapter'}")
        return True


@dataclass(frozen=True)
class Systemd(_ServiceRestart):
    method = "systemd"


@dataclass(frozen=True)
class Launchd(_ServiceRestart):
    method = "launchd"
    manager = "launchctl"

    def command(self) -> str:
        return f"launchctl kickstart -k {self.unit}"
