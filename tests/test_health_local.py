"""`deploy --health-local`: the pre-activation check runs on this machine against the stored
artifact, with the same engine; verify still checks the live endpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import MODEL, TRANSLATOR

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

RECORDER = [sys.executable, str(Path(__file__).parent / "data" / "e2e_record_release.py"), "{release}"]


def test_health_local_checks_the_store_copy_before_activation_and_the_endpoint_after(workspace, tmp_path):
    ws = workspace
    record = tmp_path / "releases-checked.txt"
    text = ws.config.read_text().replace(json.dumps(TRANSLATOR), json.dumps(RECORDER))
    ws.config.write_text(
        text.replace(
            "      timeout_s: 20\n",
            f"      timeout_s: 20\n      env: {{E2E_RECORD: {json.dumps(str(record))}}}\n",
        )
    )
    plan = ws.cli(
        "deploy", "--cycle", "1", "--models", MODEL, "-e", "rtx-1", "--dry-run", "--health-local", check=0
    )
    assert "on this machine (--health-local)" in plan.stdout
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "rtx-1", "--health-local", check=0)
    vid = ws.active("rtx-1")
    checked = record.read_text().splitlines()
    assert checked == [str(ws.store / MODEL / vid), f"{ws.endpoints['rtx-1']}/{MODEL}/active"]
