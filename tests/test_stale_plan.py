"""A plan is made from facts read without the lock; another command may change the endpoint before
this one takes it. Under the lock the facts are read again: a deploy is planned again (and says what
changed), a rollback is refused with exit 3 — never a stale plan applied as is."""

from __future__ import annotations

import pytest
from conftest import MODEL

from adapterctl import api
from adapterctl.config import load_config
from adapterctl.execute import RunContext, execute
from adapterctl.facts import gather
from adapterctl.identity import Identity
from adapterctl.plan import plan_deploy, plan_rollback
from adapterctl.transports.local import LocalTransport

pytestmark = pytest.mark.heavy


def _facts(cfg, endpoint: str):
    return {endpoint: gather(cfg.endpoints[endpoint], LocalTransport(endpoint), [MODEL])}


def _run(cfg, plan, endpoint: str, lines: list[str]):
    ctx = RunContext(cfg, {endpoint: LocalTransport(endpoint)}, Identity.current(), progress=lines.append)
    return execute(plan, ctx)


def test_a_deploy_planned_before_another_deploy_finished_is_planned_again(workspace, monkeypatch):
    ws = workspace
    monkeypatch.chdir(ws.root)
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    v1 = ws.active("rtx-1")
    ws.new_adapter(MODEL, "run2", seed=2)
    ws.cli("register", "--model", MODEL, "--cycle", "2", check=0)
    cfg = load_config(ws.config)
    [t2] = api.resolve_targets(cfg, [MODEL], None, _newest(ws), None)
    stale = plan_deploy(cfg, "stale-1", [t2], _facts(cfg, "rtx-1"))  # made while v1 is active
    ws.new_adapter(MODEL, "run3", seed=3)
    ws.cli("deploy", "--cycle", "3", "--models", MODEL, "--endpoints", "rtx-1", check=0)  # meanwhile
    v3 = ws.active("rtx-1")
    lines: list[str] = []
    report = _run(cfg, stale, "rtx-1", lines)
    text = "\n".join(lines)
    assert report.exit_code == 0, text
    assert f"active was {v1}, now {v3}" in text and "planned again" in text, text
    assert ws.active("rtx-1") == t2.version_id
    assert ws.previous("rtx-1") == v3  # not v1, which the stale plan would have set


def test_a_rollback_planned_before_another_deploy_finished_is_refused_exit_3(workspace, monkeypatch):
    ws = workspace
    monkeypatch.chdir(ws.root)
    for cycle in (1, 2):
        ws.new_adapter(MODEL, f"run{cycle}", seed=cycle)
        ws.cli("deploy", "--cycle", str(cycle), "--models", MODEL, "--endpoints", "rtx-1", check=0)
    cfg = load_config(ws.config)
    stale = plan_rollback(cfg, "stale-r", [("rtx-1", MODEL)], _facts(cfg, "rtx-1"), "previous")
    ws.new_adapter(MODEL, "run3", seed=3)
    ws.cli("deploy", "--cycle", "3", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    v3 = ws.active("rtx-1")
    lines: list[str] = []
    report = _run(cfg, stale, "rtx-1", lines)
    assert report.exit_code == 3, lines
    assert "refusing to apply a stale plan" in "\n".join(lines)
    assert ws.active("rtx-1") == v3


def _newest(ws) -> str:
    import json

    return json.loads((ws.store / "manifest.json").read_text())["versions"][MODEL][-1]["version_id"]
