"""The result of one (endpoint, model) pipeline, and how results become one exit code."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from adapterctl.errors import EXIT_FAILURE, EXIT_HEALTH, EXIT_LOCKED, EXIT_OK, EXIT_ROLLED_BACK

STATUS_EXIT = {
    "skipped": EXIT_OK,  # a canary failure sets the exit code; the untouched endpoints add nothing
    "success": EXIT_OK,
    "noop": EXIT_OK,
    "aborted": EXIT_HEALTH,
    "rolled_back": EXIT_ROLLED_BACK,
    "locked": EXIT_LOCKED,
    "stale": EXIT_LOCKED,
    "failed": EXIT_FAILURE,
}
EXIT_SEVERITY = [EXIT_OK, EXIT_HEALTH, EXIT_ROLLED_BACK, EXIT_LOCKED, EXIT_FAILURE]


def worst(codes: list[int]) -> int:
    return max(codes, key=EXIT_SEVERITY.index, default=EXIT_OK)


@dataclass
class Outcome:
    """What happened to one (endpoint, model) pipeline."""

    endpoint: str
    model: str
    version: str | None
    status: str = "success"
    phases_completed: list[str] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    restarted: bool = False  # reload_method restart: the service manager restarted the service
    convert: str | None = None  # peft | cached | built | rebuilt (...): what the convert step did
    artifact: dict[str, Any] | None = None  # the converted artifact's manifest record, with its dir
    recovered: str | None = None  # what this command finished for an interrupted one

    @property
    def done(self) -> bool:
        return self.status != "success"
