"""Leftovers of interrupted commands: `doctor` lists them with their size, `adapterctl gc` removes them,
and a staging dir that an open transaction will resume from is kept."""

from __future__ import annotations

import json
import os

import pytest
from conftest import MODEL

pytestmark = pytest.mark.heavy


def test_doctor_lists_leftovers_and_gc_removes_them_but_keeps_a_resumable_staging(workspace):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    # a store copy of a run that died (pid that cannot exist), and a temp file of an interrupted write
    dead = ws.store / MODEL / ".cycle9_20260101_deadbeef.incoming.999999999"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    adir = ws.endpoints["rtx-1"]
    (adir / ".status.json.999999999.tmp").write_text("{}")
    # a deploy killed mid-transfer: its staging is resumable and belongs to an open transaction
    ws.new_adapter(MODEL, "run2", seed=2, hidden=131072)
    argv = ["deploy", "--cycle", "2", "--models", MODEL, "--endpoints", "rtx-1"]
    assert ws.cli_faulted("bytes:4000000", *argv).returncode == -9
    staging = adir / MODEL / "staging"
    [resumable] = os.listdir(staging)

    checks = ws.cli_json("doctor", "--endpoints", "rtx-1")
    rows = {(c["endpoint"], c["name"]): c for c in checks}
    assert str(dead) in rows[("local", "leftovers")]["detail"]
    assert ".status.json.999999999.tmp" in rows[("rtx-1", "leftovers")]["detail"]
    assert "stopped before the swap" in rows[("rtx-1", "unfinished transaction")]["detail"]

    dry = json.loads(ws.cli("gc", "--endpoints", "rtx-1", "--dry-run", "--json", check=0).stdout)
    assert {r["path"] for r in dry["removed"]} >= {str(dead), str(adir / ".status.json.999999999.tmp")}
    assert dead.exists()
    gone = json.loads(ws.cli("gc", "--endpoints", "rtx-1", "--json", check=0).stdout)
    assert not dead.exists() and not (adir / ".status.json.999999999.tmp").exists()
    assert os.listdir(staging) == [resumable]  # the next deploy resumes from it
    assert all(r["bytes"] >= 0 for r in gone["removed"])
    [line] = [r for r in ws.log() if r["action"] == "gc"]
    assert line["status"] == "success" and line["removed"] == len(gone["removed"])

    again = ws.cli_json(*argv, check=0)
    [o] = again["outcomes"]
    assert o["status"] == "success" and os.listdir(staging) == []
