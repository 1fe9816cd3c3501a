"""The version phase's write: validate, hash and store an adapter, then record it in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from adapterctl.errors import UsageError, VersionConflict
from adapterctl.identity import Identity, iso
from adapterctl.manifest import locked
from adapterctl.names import check_cycle
from adapterctl.versioning import (
    check_existing,
    inspect_adapter,
    manifest_entry,
    report_not_shipped,
    store_copy,
    version_id,
)


def register_version(
    cfg: Any,
    model: str,
    source: Path,
    cycle: int | None,
    clock: Callable[[], datetime],
    identity: Identity,
    expect: Any = None,
) -> tuple[str, bool]:
    """Validate, hash and store an adapter; record it. Returns (version_id, newly_created).

    Raises AdapterInvalid, VersionConflict, ManifestCorrupt.
    """
    if cycle is None:
        raise UsageError("registering a new adapter needs --cycle N")
    check_cycle(cycle)
    # the planner already validated and hashed it; the store copy below re-checks every byte
    info = expect.info if expect is not None and expect.info is not None else inspect_adapter(source)
    with locked(cfg.store) as manifest:
        existing = manifest.by_sha(model, info.sha256)
        check_existing(model, existing, info)
        if existing:
            store_copy(cfg.store, model, existing["version_id"], info)  # heal a missing store dir
            report_not_shipped(info)
            return existing["version_id"], False
        vid = version_id(cycle, clock(), info.sha256)
        if expect is not None and expect.version_id != vid:
            raise VersionConflict(
                f"model {model}: {source} changed since the plan was made "
                f"(now {vid}, planned {expect.version_id})",
                "run the command again",
            )
        clash = manifest.version(model, vid)
        if clash:
            raise VersionConflict(f"model {model}: {vid} is already registered with sha256 {clash['sha256']}")
        store_copy(cfg.store, model, vid, info)
        manifest.add_version(
            model, manifest_entry(info, vid, cycle, iso(clock()), f"{identity.user}@{identity.host}")
        )
    report_not_shipped(info)
    return vid, True
