"""Temp paths that interrupted commands leave behind, here and on endpoints: listed by `doctor`,
removed by `adapterctl gc`.

Every temp path adapterctl makes names its owner's pid (or sits in a dir adapterctl owns), so a
leftover is one whose owner is gone: a store copy `.{id}.incoming.{pid}`, a conversion scratch dir
`.{key}.tmp-{pid}`, an atomic-write temp `.{name}.{pid}.tmp`, an SSH ControlMaster dir
`adctl-{pid}-*`; on endpoints, staging dirs no open transaction will reuse, swap temp links, temp
files of atomic writes (endpoint_ops.leftovers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from adapterctl.endpoint_ops import pid_alive, remove_path, tree_size

_PID_TEMP = re.compile(r"^\..+\.incoming\.(\d+)$|^\..+\.tmp-(\d+)$|^\..+\.(\d+)\.tmp$")


@dataclass(frozen=True)
class Leftover:
    where: str  # "local" or an endpoint name
    path: str
    bytes: int
    what: str


def local_leftovers(store: Path) -> list[Leftover]:
    """This machine's leftovers: in the store (and its conversion cache), and stale SSH control dirs."""
    from adapterctl.transports.ssh import stale_control_dirs

    found: list[Leftover] = []
    roots = (
        [store, store / ".cache" / "convert", *(p for p in store.iterdir() if p.is_dir())]
        if store.is_dir()
        else []
    )
    for root in roots:
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            m = _PID_TEMP.match(entry.name)
            pid = next((g for g in m.groups() if g), None) if m else None
            if pid is not None and not pid_alive(int(pid)):
                what = "store copy" if ".incoming." in entry.name else "temp of an interrupted write or build"
                found.append(Leftover("local", str(entry), tree_size(str(entry)), what))
    for path, size in stale_control_dirs():
        found.append(Leftover("local", str(path), size, "SSH control dir of a run that is gone"))
    return found


def remove_local(items: list[Leftover]) -> list[Leftover]:
    removed = []
    for item in items:
        remove_path(item.path)
        if not os.path.lexists(item.path):
            removed.append(item)
    return removed
