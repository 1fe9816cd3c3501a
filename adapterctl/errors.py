"""Typed errors and the one place where they map to exit codes (DESIGN §8)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # a phase failed (transfer, reload, I/O...)
EXIT_USAGE = 2  # usage, config or input validation error; nothing written
EXIT_LOCKED = 3  # another deploy holds the endpoint lock
EXIT_HEALTH = 4  # pre-activation health check failed; active untouched
EXIT_ROLLED_BACK = 5  # post-activation verify failed; rolled back

EXIT_CODES_DOC = {
    EXIT_OK: "success (or nothing to do)",
    EXIT_FAILURE: "a phase failed (transfer, hash verify, reload, I/O)",
    EXIT_USAGE: "usage, config or input error; nothing was written",
    EXIT_LOCKED: "the endpoint lock is held by another deploy",
    EXIT_HEALTH: "health check failed before activation; active untouched",
    EXIT_ROLLED_BACK: "verify failed after activation; rolled back automatically",
}


class AdapterctlError(Exception):
    """Base error: `message` says what failed and where, `hint` what to do next."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} — {self.hint}"


class UsageError(AdapterctlError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """adapterctl.yaml (or a suite file) is malformed or invalid."""


class AdapterInvalid(UsageError):
    """An adapter directory is not a valid PEFT LoRA adapter."""


class VersionConflict(UsageError):
    """The same version id already holds different bytes."""


class ManifestCorrupt(UsageError):
    """manifest.json (or status.json) does not parse; it is never overwritten."""


class TransportError(AdapterctlError):
    """A command or file operation on an endpoint failed; `kind` and `data` come from the endpoint op."""

    kind: str = "error"
    data: dict | None = None


class PhaseError(AdapterctlError):
    """A pipeline phase failed for one (model, endpoint)."""


class LockHeld(AdapterctlError):
    exit_code = EXIT_LOCKED


class StalePlan(AdapterctlError):
    """The endpoint changed between planning and taking its lock, and the plan cannot be redone."""

    exit_code = EXIT_LOCKED


class HealthCheckFailed(AdapterctlError):
    exit_code = EXIT_HEALTH


class RolledBack(AdapterctlError):
    exit_code = EXIT_ROLLED_BACK
