"""The one Transport interface every phase talks to (DESIGN §3, STYLE).

Endpoint-side file operations live in `adapterctl.endpoint_ops`, a dependency-free module
that every transport runs on the endpoint (in-process for local, by the remote `python3`
for SSH). A transport therefore only has to know how to: call an op, sync a tree, run or
spawn a program. Phases never see which transport they use.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import TransportError, UsageError


@dataclass(frozen=True)
class CommandResult:
    """What a command run on an endpoint returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class SyncResult:
    """What a transfer moved over the wire."""

    files_sent: int
    bytes_sent: int


ProgressFn = Callable[[int], None]  # called with each chunk's byte count


class Transport(ABC):
    """Access to one endpoint. Use as a context manager; one instance per endpoint per run."""

    def __init__(self, name: str, where: str):
        self.name = name  # endpoint name, used in every message
        self.where = where  # "local" or "user@host"

    # -- the primitives each transport implements -------------------------------------------
    @abstractmethod
    def _call_raw(self, request: dict) -> dict:
        """Run one endpoint_ops request on the endpoint and return its decoded response."""

    @abstractmethod
    def sync_files(
        self,
        src: Path,
        dest: str,
        names: Sequence[str],
        basis: str | None = None,
        progress: ProgressFn | None = None,
        resume: bool = False,
    ) -> SyncResult:
        """Send the files `names` (relative to local `src`) into endpoint directory `dest`.

        `basis` is an endpoint directory with older versions of the same files: given, changed
        files are sent as deltas against them (for large, mostly unchanged files such as merged
        GGUFs); without it whole files are sent (LoRA weights change in every byte).
        `resume`: pieces of an interrupted transfer are in dest's partial dir: continue from them
        (delta against the piece) instead of sending whole files again.
        Never leaves a truncated file under its final name. Raises TransportError.
        """

    @abstractmethod
    def spawn(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> subprocess.Popen:
        """Start `argv` on the endpoint with binary stdin/stdout/stderr pipes."""

    @abstractmethod
    def run(
        self, argv: Sequence[str], input: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run `argv` on the endpoint to completion; never raises for a non-zero exit."""

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release connections; safe to call twice."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoint operations, shared by every transport ------------------------------------
    def call(self, op: str, **args: Any) -> Any:
        """Run endpoint operation `op` (see endpoint_ops.OPS); map its errors to typed ones."""
        response = self._call_raw({"op": op, "args": args})
        if response.get("ok"):
            return response.get("result")
        err = response.get("error") or {}
        kind, message = err.get("kind", "error"), err.get("message", "unknown error")
        where = f"endpoint {self.name} ({self.where})"
        if kind == "invalid":
            raise UsageError(f"{where}: {message}")
        exc = TransportError(f"{where}: {op} failed: {message}", err.get("hint"))
        exc.kind, exc.data = kind, err.get("data")
        raise exc
