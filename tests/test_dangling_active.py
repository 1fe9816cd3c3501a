"""A dangling `active` (its release was deleted by hand): `status` calls it broken, and both a deploy and
`rollback --to VERSION|base` get out of it; nothing keeps or returns to the missing release."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MODEL

pytestmark = pytest.mark.heavy


def _deploy(ws, cycle: int):
    ws.new_adapter(MODEL, f"run{cycle}", seed=cycle)
    ws.cli("deploy", "--cycle", str(cycle), "--models", MODEL, "--endpoints", "rtx-1", check=0)
    return ws.active("rtx-1")


def _break(ws, version: str) -> None:
    release = ws.endpoints["rtx-1"] / MODEL / "releases" / version
    for p in release.rglob("*"):
        p.chmod(0o644)
    shutil.rmtree(release)


@pytest.mark.parametrize("way_out", ["deploy", "rollback-to-version", "rollback-to-base"])
def test_a_dangling_active_is_broken_in_status_and_there_is_a_way_out(workspace, way_out):
    ws = workspace
    v1, v2 = _deploy(ws, 1), _deploy(ws, 2)
    _break(ws, v2)
    rows = json.loads(ws.cli("status", "--endpoints", "rtx-1", "--json", check=0).stdout)
    [row] = [r for r in rows if r["model"] == MODEL]
    assert row["health_status"] == "broken" and any("not a complete release" in d for d in row["drift"]), row
    if way_out == "deploy":
        v3 = _deploy(ws, 3)
        assert ws.active("rtx-1") == v3 and ws.previous("rtx-1") == v1
    elif way_out == "rollback-to-version":
        ws.cli("rollback", "--endpoints", "rtx-1", "--models", MODEL, "--to", v1, check=0)
        assert ws.active("rtx-1") == v1
    else:
        ws.cli("rollback", "--endpoints", "rtx-1", "--models", MODEL, "--to", "base", check=0)
        assert ws.active("rtx-1") is None and ws.previous("rtx-1") == v1
    rows = json.loads(ws.cli("status", "--endpoints", "rtx-1", "--json", check=0).stdout)
    assert all(r["health_status"] != "broken" for r in rows), rows
