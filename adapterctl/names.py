"""Validation of names and paths that come from config or the command line.

Model names, endpoint names and version ids end up in remote paths and commands, so they
are restricted to a safe alphabet and may never climb out of their root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adapterctl.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_ID = re.compile(r"^cycle(\d{1,6})_(\d{8})_([0-9a-f]{8})$")


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a safe model/endpoint name; raise UsageError otherwise."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise UsageError(
            f"invalid {kind} name {value!r}",
            "use letters, digits, '_', '-' and '.', starting with a letter or digit, no '..'",
        )
    return value


def check_version_id(value: str) -> str:
    """Return `value` if it has the form cycle{N}_{YYYYMMDD}_{sha8}; raise UsageError otherwise."""
    if not isinstance(value, str) or not VERSION_ID.match(value):
        raise UsageError(
            f"invalid version id {value!r}",
            "version ids look like cycle3_20260401_f1e2d3c4 (see `adapterctl versions`)",
        )
    return value


def inside(root: Path | str, *parts: str) -> Path:
    """Join `parts` under `root` and return the path, refusing anything that escapes root."""
    base = Path(os.path.abspath(root))
    candidate = Path(os.path.abspath(base.joinpath(*parts)))
    if candidate != base and base not in candidate.parents:
        raise UsageError(f"path {'/'.join(parts)!r} escapes {base}", "remove '..' and absolute parts")
    return candidate


def check_cycle(cycle: int) -> int:
    """Return `cycle` if it can form a version id (0..999999); raise UsageError otherwise."""
    if isinstance(cycle, bool) or not isinstance(cycle, int) or not 0 <= cycle <= 999_999:
        raise UsageError(f"invalid cycle {cycle!r}", "a training cycle is a whole number from 0 to 999999")
    return cycle
