"""What every health engine shares: the target it checks, the engine interface and the
placeholders of its command templates. Engines import this; it imports no engine."""

from __future__ import annotations

import re
import shlex
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from adapterctl.errors import ConfigError
from adapterctl.transports.base import Transport

PLACEHOLDERS = ("release", "model", "version", "endpoint", "adapter_dir")


@dataclass(frozen=True)
class HealthTarget:
    """The release a health check exercises; paths are on the endpoint."""

    endpoint: str
    model: str
    version_id: str
    release_path: str  # releases/<version_id> or the `active` link
    adapter_dir: str
    base_model: str | None
    transport: Transport = field(compare=False, repr=False)


class HealthEngine(ABC):
    """Produces outputs for one target between start() and close(). Use as a context manager."""

    name = "engine"

    @abstractmethod
    def start(self, target: HealthTarget) -> None:
        """Load the model for `target`. Raises PhaseError when it cannot."""

    @abstractmethod
    def generate(self, prompt: str) -> str:
        """Return the output for `prompt`. Raises PhaseError when the engine fails."""

    @abstractmethod
    def close(self) -> None:
        """Release everything start() acquired; safe to call twice, never raises."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the dry-run plan."""

    def __enter__(self) -> HealthEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def show_argv(argv: Sequence[str]) -> str:
    # Like shlex.join, but leaves {placeholders} readable.
    return " ".join(a if a and not re.search(r"[\s'\"\\]", a) else shlex.quote(a) for a in argv)


def check_template(
    argv: Sequence[str], allowed: Sequence[str] = PLACEHOLDERS, what: str = "health command argument"
) -> None:
    for arg in argv:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"{what} {arg!r}: {exc}", "write literal braces as {{ and }}") from None
        for name in names:
            if name not in allowed:
                raise ConfigError(
                    f"{what} {arg!r}: unknown placeholder {{{name}}}",
                    f"valid placeholders: {', '.join('{' + p + '}' for p in allowed)}",
                )
