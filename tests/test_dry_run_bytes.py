"""The dry run's byte count is what the real run sends (within 1%), locally and over SSH with rsync's own
count — including a rerun that resumes an interrupted transfer."""

from __future__ import annotations

import json

import pytest
from conftest import MODEL
from test_ssh import deploy_argv, ssh_workspace  # noqa: F401 - the fixture

pytestmark = pytest.mark.heavy


def _planned_and_sent(ws, argv: list[str]) -> tuple[int, int]:
    planned = json.loads(ws.cli(*argv, "--dry-run", "--json", check=0).stdout)["bytes_to_send"]
    report = json.loads(ws.cli(*argv, "--json", check=0).stdout)
    return planned, sum(o["bytes_sent"] for o in report["outcomes"])


def test_dry_run_bytes_match_rsyncs_count_over_ssh_within_one_percent(ssh_workspace):  # noqa: F811
    ws = ssh_workspace
    ws.new_adapter(MODEL, "run1", seed=1, hidden=16384)  # 2 MiB of weights
    planned, sent = _planned_and_sent(ws, deploy_argv(1, ("mac-1", "linux-1"), [MODEL]))
    assert planned > 4 << 20 and abs(sent - planned) <= planned * 0.01, (planned, sent)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=16384)
    planned, sent = _planned_and_sent(ws, deploy_argv(2, ("mac-1", "linux-1"), [MODEL]))
    assert abs(sent - planned) <= planned * 0.01, (planned, sent)


def test_dry_run_bytes_of_a_resumed_local_transfer_match_what_is_sent(workspace):
    ws = workspace
    ws.new_adapter(MODEL, "run1", seed=1, hidden=131072)
    argv = ["deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1"]
    total = json.loads(ws.cli(*argv, "--dry-run", "--json", check=0).stdout)["bytes_to_send"]
    assert ws.cli_faulted("bytes:8000000", *argv).returncode == -9
    planned, sent = _planned_and_sent(ws, argv)
    assert planned <= total - (8 << 20) and abs(sent - planned) <= planned * 0.01, (total, planned, sent)
