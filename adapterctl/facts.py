"""Typed facts about an endpoint, read in one round trip and never written (STYLE: pyinfra).

`gather()` asks the endpoint's `facts` operation and turns its JSON into frozen values the planner
reads. `basis()` is what a plan relied on: the executor re-reads the facts under the endpoint lock
and compares, so a plan made stale by another command is never applied as is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapterctl.config import EndpointConfig
from adapterctl.transports.base import Transport


@dataclass(frozen=True)
class Release:
    version_id: str
    complete: bool
    files: Mapping[str, str] = field(hash=False)  # relative path -> sha256 (RELEASE.json)
    mtime: float = 0.0
    format: str | None = None
    quant: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    active: str | None  # version id, None (no link) or "?" (a link adapterctl did not make)
    previous: str | None
    releases: tuple[Release, ...]
    staging: Mapping[str, Mapping[str, int]] = field(default_factory=dict, hash=False)  # version -> sizes

    def release(self, version: str | None) -> Release | None:
        return next((r for r in self.releases if r.version_id == version), None)

    def complete(self) -> list[str]:
        return [r.version_id for r in self.releases if r.complete]

    def usable(self, version: str | None) -> str | None:
        """`version` if it is a complete release here, else None: a link to a missing or partial release
        (a dangling `active`) is never a target to keep or return to."""
        return version if version in self.complete() else None

    def keep_as_previous(self, target: str | None) -> str | None:
        """What `previous` points at once `active` moves to `target`: the old `active`; when that link is
        broken, the old `previous` instead (if complete, and not the target itself)."""
        if not self.broken:
            return self.active
        kept = self.usable(self.previous)
        return kept if kept != target else None

    @property
    def broken(self) -> bool:
        """`active` points at something that is not a complete release (deleted, partial, foreign)."""
        return self.active is not None and self.usable(self.active) is None

    def newest(self) -> Release | None:
        done = [r for r in self.releases if r.complete]
        return max(done, key=lambda r: r.mtime) if done else None


@dataclass(frozen=True)
class LockFacts:
    state: str  # held | empty | binary | garbage | unreadable
    holder: Mapping[str, Any] | None = field(hash=False)
    raw_sha: str | None
    size: int | None
    age_s: float
    preview: str = ""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> LockFacts:
        """From endpoint_ops.read_lock's JSON."""
        return cls(
            raw["state"],
            raw.get("holder"),
            raw.get("raw_sha"),
            raw.get("size"),
            float(raw.get("age_s") or 0.0),
            raw.get("preview") or "",
        )

    def describe(self, path: str) -> str:
        """Who holds the lock, or what is wrong with the lock file, in words."""
        h = self.holder or {}
        if self.state == "held":
            return (
                f"locked by {h.get('user')}@{h.get('host')} pid {h.get('pid')} since {h.get('started_at')} "
                f"(deployment {h.get('deployment_id')}, `{h.get('command') or '?'}`, {self.age_s:.0f} s ago)"
            )
        what = {
            "empty": "is empty (0 bytes of holder)",
            "binary": f"holds binary data ({self.size} bytes, starts {self.preview})",
            "garbage": f"holds no valid holder record ({self.size} bytes: {self.preview!r})",
            "unreadable": f"cannot be read ({self.preview})",
        }[self.state]
        return f"lock file {path} {what}, last written {self.age_s:.0f} s ago"


@dataclass(frozen=True)
class JournalFacts:
    """The open transaction of an endpoint's journal: the records of a command that did not end."""

    records: tuple[Mapping[str, Any], ...] = field(hash=False)

    @property
    def begin(self) -> Mapping[str, Any]:
        return self.records[0]

    @property
    def txn(self) -> str:
        return str(self.begin.get("txn"))


@dataclass(frozen=True)
class PidFacts:
    pid: int | None
    alive: bool
    error: str | None


@dataclass(frozen=True)
class EndpointFacts:
    name: str
    adapter_dir_exists: bool
    writable: bool
    free_bytes: int
    python: str
    platform: str
    models: Mapping[str, ModelFacts] = field(hash=False)
    lock: LockFacts | None = None
    journal: JournalFacts | None = None
    status: Mapping[str, Any] | None = field(default=None, hash=False)  # status.json as read
    status_error: str | None = None
    pid: PidFacts | None = None
    loaded: Mapping[str, Any] | None = field(default=None, hash=False)  # loaded.json of the service
    compat: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    base_gguf: Mapping[str, Any] | None = field(default=None, hash=False)
    problem: str | None = None
    adapter_dir: str = ""
    parent_exists: bool = True  # adapter_dir's parent: never created by a deploy (only adapter_dir is)

    def model_status(self, model: str) -> Mapping[str, Any]:
        return ((self.status or {}).get("models") or {}).get(model) or {}

    def last_good(self, model: str) -> str | None:
        return self.model_status(model).get("last_good_version")

    def basis(self) -> tuple[Any, ...]:
        """What a plan made from these facts relies on: links, complete releases, the open transaction."""
        links = tuple(
            (m, mf.active, mf.previous, tuple(sorted(mf.complete()))) for m, mf in sorted(self.models.items())
        )
        return (links, self.journal.txn if self.journal else None)

    def changes_since(self, old: EndpointFacts) -> list[str]:
        """Human lines for what differs from `old` in the parts a plan relies on."""
        lines = []
        for m, mf in self.models.items():
            before = old.models.get(m)
            if before is None:
                continue
            for slot in ("active", "previous"):
                if getattr(before, slot) != getattr(mf, slot):
                    lines.append(f"{m}: {slot} was {getattr(before, slot)}, now {getattr(mf, slot)}")
            gone = set(before.complete()) - set(mf.complete())
            new = set(mf.complete()) - set(before.complete())
            if gone:
                lines.append(f"{m}: releases removed: {', '.join(sorted(gone))}")
            if new:
                lines.append(f"{m}: releases added: {', '.join(sorted(new))}")
        if (old.journal and old.journal.txn) != (self.journal and self.journal.txn):
            lines.append("the endpoint's journal changed (another command ran there)")
        return lines


def parse(name: str, raw: Mapping[str, Any], adapter_dir: str = "") -> EndpointFacts:
    """EndpointFacts from the JSON of endpoint_ops.facts."""
    models = {
        m: ModelFacts(
            active=mf["active"],
            previous=mf["previous"],
            releases=tuple(
                Release(
                    r["version_id"],
                    bool(r["complete"]),
                    dict(r.get("files") or {}),
                    float(r.get("mtime") or 0.0),
                    r.get("format"),
                    r.get("quant"),
                )
                for r in mf["releases"]
            ),
            staging={v: dict(sizes) for v, sizes in (mf.get("staging") or {}).items()},
        )
        for m, mf in (raw.get("models") or {}).items()
    }
    lock = raw.get("lock")
    pid = raw.get("pid")
    journal = raw.get("journal")
    return EndpointFacts(
        name=name,
        adapter_dir_exists=bool(raw.get("adapter_dir_exists")),
        writable=bool(raw.get("writable")),
        free_bytes=int(raw.get("free_bytes") or 0),
        python=str(raw.get("python") or ""),
        platform=str(raw.get("platform") or ""),
        models=models,
        lock=LockFacts.parse(lock) if lock else None,
        journal=JournalFacts(tuple(journal)) if journal else None,
        status=raw.get("status"),
        status_error=raw.get("status_error"),
        pid=PidFacts(pid.get("pid"), bool(pid.get("alive")), pid.get("error")) if pid else None,
        loaded=raw.get("loaded"),
        compat=raw.get("compat") or {},
        base_gguf=raw.get("base_gguf"),
        problem=raw.get("problem"),
        adapter_dir=adapter_dir,
        parent_exists=bool(raw.get("parent_exists", True)),
    )


def compat_link_paths(ep: EndpointConfig) -> dict[str, str]:
    """Absolute link path on the endpoint -> model, for the endpoint's `compat_links`."""
    parent = os.path.dirname(ep.adapter_dir.rstrip("/"))
    return {os.path.join(parent, rel): model for rel, model in ep.compat_links.items()}


def loaded_file(pidfile: str | None, model: str | None = None) -> str | None:
    """Where the serving helper reports what it loaded, beside its pidfile: loaded.json (the latest
    report) or, for one model of a process that serves several, loaded.<model>.json."""
    if not pidfile:
        return None
    return os.path.join(os.path.dirname(pidfile), f"loaded.{model}.json" if model else "loaded.json")


def gather(ep: EndpointConfig, transport: Transport, models: list[str]) -> EndpointFacts:
    """Read an endpoint's state (releases, links, lock, journal, status, serving pid) in one call."""
    raw = transport.call(
        "facts",
        adapter_dir=ep.adapter_dir,
        models=models,
        pidfile=ep.pidfile if ep.reload_method in ("sigusr1", "restart") else None,
        compat_links=compat_link_paths(ep),
        loaded_file=loaded_file(ep.pidfile),
        base_gguf=ep.base_gguf.path if ep.base_gguf else None,
    )
    return parse(ep.name, raw, ep.adapter_dir)
