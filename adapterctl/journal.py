"""The per-endpoint journal of transactions (DESIGN §9; STYLE: dpkg's half-installed states).

Every side effect of a transaction is bracketed on the endpoint by `intent` and `done` records
(one fsynced append each), between `begin` and `commit`/`abort`. A command that takes the lock
reads the open transaction first and finishes or undoes it; `state_of()` names where it stopped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapterctl.facts import JournalFacts, ModelFacts
from adapterctl.identity import iso
from adapterctl.transports.base import Transport


def new_txn_id() -> str:
    return secrets.token_hex(6)


@dataclass
class Journal:
    """Appends an endpoint's journal records through its transport."""

    transport: Transport
    adapter_dir: str
    clock: Callable[[], datetime]

    def append(self, *records: dict[str, Any]) -> None:
        now = iso(self.clock())
        self.transport.call(
            "journal_append", adapter_dir=self.adapter_dir, records=[dict(r, at=now) for r in records]
        )

    def open(self) -> JournalFacts | None:
        records = self.transport.call("journal_open", adapter_dir=self.adapter_dir)
        return JournalFacts(tuple(records)) if records else None


@dataclass(frozen=True)
class TxnState:
    """Where an interrupted transaction stopped, and what finishing it means."""

    name: str  # before-swap | half-swapped | swapped | verified | compensating | rollback
    action: str  # abandon | undo-swap | roll-forward | commit | compensate | complete
    text: str


def _forward(records: tuple[Mapping[str, Any], ...], t: str, action: str) -> bool:
    return any(r["t"] == t and r.get("action") == action and not r.get("comp") for r in records)


def state_of(journal: JournalFacts, mf: ModelFacts | None) -> TxnState:
    """Name the state of an open transaction from its records and the links as they are now."""
    b = journal.begin
    rec = journal.records
    version, kind = b.get("version"), b.get("kind")
    restore = (b.get("restore") or {}).get("active")
    active = mf.active if mf else None
    if kind == "rollback":
        return TxnState(
            "rollback",
            "complete",
            f"an interrupted rollback of {b.get('model')} to {version or 'the base model'}: "
            f"complete it (links, reload, verify)",
        )
    if any(r["t"] == "compensate" for r in rec):
        return TxnState(
            "compensating",
            "compensate",
            f"the deploy of {version} failed after the swap and was rolling back: "
            f"finish the rollback to {restore or '(none)'}",
        )
    if _forward(rec, "done", "verify"):
        return TxnState("verified", "commit", f"the deploy of {version} was verified: record it as healthy")
    if _forward(rec, "intent", "swap"):
        if active == version:
            return TxnState(
                "swapped",
                "roll-forward",
                f"the deploy of {version} stopped after the swap (active → {version}, not verified): "
                "reload and "
                f"verify it now; on failure roll back to {restore or '(none)'}",
            )
        return TxnState(
            "half-swapped",
            "undo-swap",
            f"the deploy of {version} stopped inside the swap (active still {active}): put the links back",
        )
    return TxnState(
        "before-swap",
        "abandon",
        f"the deploy of {version} stopped before the swap (active untouched): close it; what was staged "
        "is kept and reused",
    )
