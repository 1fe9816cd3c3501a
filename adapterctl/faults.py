"""A test-only hook of the executor: SIGKILL adapterctl itself at a named point, to prove recovery.

ADAPTERCTL_FAULT="<step index>:before|after" (the index in `--dry-run --json`'s steps),
"c<j>:after" (the j-th step of a compensation), "bytes:N" (after N bytes were sent), or
"no-space-check" (the planner skips the free-space check, as if the space went after planning), or
"pause:<index>:before|after:<file>" (touch <file>.reached, then wait there until <file> exists).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

FAULT_ENV = "ADAPTERCTL_FAULT"


class Faults:
    """A test-only hook: SIGKILL this process at a named step boundary, or after N bytes were sent."""

    def __init__(self, spec: str | None):
        self.spec = spec or ""
        self.sent = 0

    def at(self, key: str, when: str) -> None:
        if self.spec == f"{key}:{when}":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.spec.startswith(f"pause:{key}:{when}:"):  # hold here until the test creates the file
            gate = Path(self.spec.split(":", 3)[3])
            Path(f"{gate}.reached").touch()
            deadline = time.monotonic() + 300
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    def wrap_board(self, board: Any) -> Any:
        if not self.spec.startswith("bytes:"):
            return board
        limit, faults = int(self.spec.split(":", 1)[1]), self

        class _Killer:
            def phase(self, endpoint: str, text: str) -> None:
                if board is not None:
                    board.phase(endpoint, text)

            def advance(self, endpoint: str, nbytes: int) -> None:
                faults.sent += nbytes
                if faults.sent >= limit:
                    os.kill(os.getpid(), signal.SIGKILL)
                if board is not None:
                    board.advance(endpoint, nbytes)

        return _Killer()
