"""LocalTransport: an endpoint that is a directory on this machine."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from adapterctl import endpoint_ops
from adapterctl.errors import TransportError
from adapterctl.transports.base import CommandResult, ProgressFn, SyncResult, Transport


class LocalTransport(Transport):
    """Runs endpoint operations in-process, through the same JSON boundary SSH uses."""

    def __init__(self, name: str = "local"):
        super().__init__(name, "local")

    def _call_raw(self, request: dict) -> dict:
        # Round-trip through JSON so local behaves exactly like a remote call would.
        return json.loads(endpoint_ops.handle(json.dumps(request)))

    def sync_files(
        self,
        src: Path,
        dest: str,
        names: Sequence[str],
        basis: str | None = None,
        progress: ProgressFn | None = None,
        resume: bool = False,
    ) -> SyncResult:
        try:
            files_sent, bytes_sent = endpoint_ops.copy_tree(str(src), dest, list(names), progress)
        except OSError as exc:
            raise TransportError(
                f"endpoint {self.name} (local): copying {src} to {dest} failed: {exc.strerror or exc}",
                "check free disk and permissions of the adapter_dir",
            ) from exc
        return SyncResult(files_sent, bytes_sent)

    def spawn(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> subprocess.Popen:
        full_env = dict(os.environ, **(env or {}))
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=cwd,
            )
        except OSError as exc:
            raise TransportError(
                f"endpoint {self.name} (local): cannot start {argv[0]!r}: {exc.strerror or exc}"
            ) from exc

    def run(
        self, argv: Sequence[str], input: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        try:
            proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransportError(f"endpoint {self.name} (local): running {argv[0]!r} failed: {exc}") from exc
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
