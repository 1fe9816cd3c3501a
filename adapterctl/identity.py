"""Who runs adapterctl and what time it is: passed in, so tests can freeze both (STYLE: habits)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Identity:
    """Who runs adapterctl, for locks and logs."""

    user: str
    host: str
    pid: int

    @classmethod
    def current(cls) -> Identity:
        import getpass

        return cls(getpass.getuser(), socket.gethostname(), os.getpid())


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
