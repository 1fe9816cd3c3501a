"""The reload protocol: trigger(), then confirm(), and what both read (the service's loaded.json).

One driver per `reload_method` (none, sigusr1, systemd, launchd), all with one protocol: `trigger()`
then `confirm()`, each bounded by the endpoint's reload_timeout_s. The planner picks the driver once,
from the config and the endpoint's facts; steps hold it, and `--dry-run` prints its `describe()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from adapterctl.errors import PhaseError
from adapterctl.facts import loaded_file
from adapterctl.transports.base import Transport


class ReloadIO(Protocol):
    """What a driver needs from the running step (steps.StepContext provides it)."""

    endpoint: str
    model: str
    transport: Transport

    def say(self, text: str) -> None: ...

    def status_update(self, fields: dict[str, Any]) -> None: ...

    def weights_sha(self, version: str | None) -> str | None: ...


@dataclass(frozen=True)
class Trigger:
    """What trigger() saw and did: the service's report before, and whether the service restarted."""

    before: Mapping[str, Any] | None
    report_path: str | None
    restarted: bool = False
    pid: int | None = None
    command: str = ""


@dataclass(frozen=True)
class ReloadDriver(ABC):
    """How one endpoint's service reloads. Subclasses are frozen values held by plan steps."""

    method: ClassVar[str] = "?"
    outage: ClassVar[str] = "0 s"
    signals_process: ClassVar[bool] = (
        False  # its trigger needs the serving process alive (checked before the swap)
    )
    timeout_s: float = 10.0
    pidfile: str | None = None

    @abstractmethod
    def describe(self, version: str | None) -> str:
        """One line for the plan: what is triggered, how it is confirmed, the expected outage."""

    @abstractmethod
    def trigger(self, io: ReloadIO) -> Trigger:
        """Make the service load `active` now. Raises PhaseError/TransportError."""

    def confirm(self, io: ReloadIO, trig: Trigger, expect: str | None) -> None:  # noqa: B027 - none confirms nothing
        """Wait until the service reports `expect` (None: no adapter). Raises PhaseError if late or wrong."""

    @property
    def needs_consent(self) -> bool:
        return False

    # -- the serving helper's report (loaded.json beside the pidfile) ----------------------------
    def report_paths(self, model: str) -> tuple[str, str] | None:
        if not self.pidfile:
            return None
        return loaded_file(self.pidfile, model), loaded_file(self.pidfile)

    def read_report(self, io: ReloadIO) -> tuple[str | None, Mapping[str, Any] | None]:
        """(path, content) of the service's report for this model: loaded.<model>.json when the service
        writes one (several models, one process), else loaded.json."""
        paths = self.report_paths(io.model)
        if paths is None:
            return None, None
        for path in paths:
            content = io.transport.call("read_json", path=path)
            if content is not None:
                return path, content
        return paths[1], None

    def await_report(
        self, io: ReloadIO, trig: Trigger, keys: tuple[str, ...], expect: str | None, late: str
    ) -> Mapping[str, Any]:
        """Wait ≤ timeout_s for a report whose `keys` differ from the one before; check it names `expect`
        and, when the manifest knows them, the expected bytes."""
        before = trig.before or {}
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = io.transport.call("read_json", path=trig.report_path) or {}
            if now and any(now.get(k) != before.get(k) for k in keys):
                break
            if time.monotonic() > deadline:
                raise PhaseError(
                    f"endpoint {io.endpoint}: {late} within {self.timeout_s:g} s "
                    f"({trig.report_path} unchanged)",
                    "check the service log; raise reload_timeout_s if it is just slow",
                )
            time.sleep(0.05)
        if not now.get("ok", True) or now.get("version_id") != expect:
            raise PhaseError(
                f"endpoint {io.endpoint}: the service reports {now.get('version_id') or 'no adapter'} "
                f"loaded, expected {expect or 'no adapter'}: {now.get('error') or 'wrong version'}"
            )
        known = io.weights_sha(expect)
        if expect and known and now.get("sha256") and now["sha256"] != known:
            raise PhaseError(
                f"endpoint {io.endpoint}: the service reports {expect} loaded, but with sha256 "
                f"{now['sha256'][:12]}… where the manifest has {known[:12]}…: it did not load these bytes"
            )
        return now

    def unconfirmable(self, io: ReloadIO, before: Mapping[str, Any] | None) -> str | None:
        """Why this reload cannot be confirmed (no report, or a report about another model), or None."""
        if before is None:
            return "no loaded.json"
        if before.get("model", io.model) != io.model:
            return f"loaded.json speaks for {before.get('model')}"
        return None

    def still_serving(self, io: ReloadIO, forward_restarted: bool, version: str | None) -> bool:  # noqa: ARG002
        """After a failed forward reload: is the old service still up serving `version` (no reload needed)?"""
        return False
