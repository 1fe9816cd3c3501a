"""manifest.json on the training box (DESIGN §4): versions, endpoints, deployments.

Reads never write. Writes happen only inside `locked()`, which takes a local lock file,
re-reads the manifest under it, and saves with temp + fsync + rename. A manifest that
does not parse is reported with its line and column and never overwritten.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.endpoint_ops import atomic_write_json
from adapterctl.errors import ManifestCorrupt, UsageError

SCHEMA = 1


def _empty() -> dict[str, Any]:
    return {"schema": SCHEMA, "versions": {}, "endpoints": {}, "deployments": []}


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=_empty)

    @classmethod
    def load(cls, store: Path) -> Manifest:
        """Read `store/manifest.json` (empty when absent). Raises ManifestCorrupt."""
        path = store / "manifest.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except UnicodeDecodeError as exc:
            raise ManifestCorrupt(
                f"{path}: not UTF-8 text (bad byte at offset {exc.start})",
                "it was left untouched; fix it by hand or restore it from a backup",
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestCorrupt(
                f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                "it was left untouched; fix it by hand or restore it from a backup",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("versions", {}), dict):
            raise ManifestCorrupt(f"{path}: top level must be an object with a 'versions' object")
        if data.get("schema", SCHEMA) > SCHEMA:
            raise ManifestCorrupt(
                f"{path}: schema {data['schema']} is newer than this adapterctl understands ({SCHEMA})",
                "upgrade adapterctl",
            )
        merged = _empty()
        merged.update(data)
        return cls(path, merged)

    def versions(self, model: str) -> list[dict[str, Any]]:
        return self.data["versions"].get(model, [])

    def version(self, model: str, version_id: str) -> dict[str, Any] | None:
        return next((v for v in self.versions(model) if v["version_id"] == version_id), None)

    def require_version(self, model: str, version_id: str) -> dict[str, Any]:
        entry = self.version(model, version_id)
        if entry is None:
            known = ", ".join(v["version_id"] for v in self.versions(model)[-5:]) or "none registered"
            raise UsageError(
                f"model {model}: version {version_id} is not in {self.path}",
                f"known versions: {known} (see `adapterctl versions`)",
            )
        return entry

    def newest(self, model: str) -> dict[str, Any] | None:
        live = [v for v in self.versions(model) if not v.get("retired")]
        return live[-1] if live else None

    def by_sha(self, model: str, sha256: str) -> dict[str, Any] | None:
        return next((v for v in self.versions(model) if v["sha256"] == sha256), None)

    def model_of(self, version_id: str) -> list[str]:
        return [
            m for m, vs in self.data["versions"].items() if any(v["version_id"] == version_id for v in vs)
        ]

    def add_version(self, model: str, entry: dict[str, Any]) -> None:
        self.data["versions"].setdefault(model, []).append(entry)

    def add_deployment(self, record: dict[str, Any]) -> None:
        self.data["deployments"].append(record)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(str(self.path), self.data)


@contextmanager
def locked(store: Path) -> Iterator[Manifest]:
    """Hold the store's lock, yield a freshly read manifest, save it when the block ends."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".manifest.lock", "a") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            manifest = Manifest.load(store)
            yield manifest
            manifest.save()
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
