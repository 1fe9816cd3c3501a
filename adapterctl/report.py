"""What a command prints: the plan (dry run, or before a real run) and the outcomes, as tables or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from adapterctl.steps import Transfer, human_bytes


def render_plan(plan, console: Console, dry_run: bool) -> None:
    """Every step, grouped by endpoint and model; each transaction's compensation under its verify."""
    head = "DRY RUN — nothing will be changed" if dry_run else "executing"
    console.print(f"Plan {plan.kind} {plan.deployment_id} ({head}); {len(plan.steps)} steps")
    verify_of = {}  # the verify step of each transaction that has a compensation -> that transaction
    for t in plan.transactions():
        verify = next((s for s in t.steps if s.action == "verify"), None)
        if t.compensation and verify is not None:
            verify_of[id(verify)] = t
    group: tuple[Any, ...] = ()
    for s in plan.steps:
        key = (s.endpoint, s.model, s.version)
        if key != group:
            group = key
            if s.endpoint is None:
                console.print("  phase version (training box)")
            elif s.model is None:
                console.print(f"  endpoint {s.endpoint}")
            else:
                console.print(
                    f"  endpoint {s.endpoint} · model {s.model} · version {s.version or '(base model)'}"
                )
        size = f"  [{human_bytes(s.bytes)}]" if isinstance(s, Transfer) else ""
        console.print(f"    {s.phase:<13} {s.describe()}{size}", markup=False)
        txn = verify_of.get(id(s))
        if txn is not None:
            console.print(f"    {'':<13} on verify failure: {txn.compensation_text()}", markup=False)
    for note in plan.notes:
        console.print(f"  · {note}", markup=False)
    for ep, _model, why in plan.blocked:
        console.print(f"  ✗ {ep}: cannot run: {why}", markup=False)
    console.print(f"  bytes to send: {human_bytes(plan.bytes_to_send())}")


def report_json(report) -> dict[str, Any]:
    plan = report.plan
    index = {id(s): i for i, s in enumerate(plan.steps)}
    return {
        "kind": plan.kind,
        "deployment_id": plan.deployment_id,
        "dry_run": report.dry_run,
        "exit_code": report.exit_code,
        "steps": [s.to_dict() for s in plan.steps],
        "transactions": [
            {
                "endpoint": t.endpoint,
                "model": t.model,
                "version": t.version,
                "kind": t.kind,
                "steps": [index.get(id(s)) for s in t.steps],
                "compensation": [s.to_dict() for s in t.compensation],
                "recovers": t.state.text if t.state else None,
            }
            for t in plan.transactions()
        ],
        "notes": list(plan.notes),
        "blocked": [{"endpoint": e, "model": m, "reason": w} for e, m, w in plan.blocked],
        "bytes_to_send": plan.bytes_to_send(),
        "outcomes": [{k: v for k, v in vars(o).items() if k != "started"} for o in report.outcomes],
    }


def add_row(table: Table, *cells: Any) -> None:
    """A table row of plain text: brackets in errors and hints (`pip install '.[gguf]'`) are not markup."""
    from rich.text import Text

    table.add_row(*(Text(str(c)) if c is not None else None for c in cells))


def _short(text: str | None, width: int = 80) -> str:
    first = (text or "").split("\n", 1)[0]
    return first if len(first) <= width and first == (text or "") else first[: width - 1] + "…"


def print_report(report, as_json: bool, out: Console) -> None:
    if as_json:
        out.print_json(json.dumps(report_json(report), default=str))
        return
    if report.dry_run:
        render_plan(report.plan, out, True)
        return
    if report.plan.kind == "convert":
        _print_conversions(report, out)
        return
    table = Table(title=f"{report.plan.kind} {report.plan.deployment_id}")
    for col in ("endpoint", "model", "version", "status", "phases", "sent", "detail"):
        table.add_column(col, overflow="fold")
    order = report.plan.endpoints
    for o in sorted(
        report.outcomes, key=lambda o: (order.index(o.endpoint) if o.endpoint in order else 0, o.model)
    ):
        detail = (
            _short(o.error)
            if o.error
            else (f"convert: {o.convert}" if o.convert not in (None, "peft") else "")
        )
        if o.recovered and not o.error:
            detail = _short(f"finished an interrupted command: {o.recovered}")
        add_row(
            table,
            o.endpoint,
            o.model,
            o.version or "-",
            o.status,
            " ".join(o.phases_completed),
            human_bytes(o.bytes_sent),
            detail,
        )
    for ep, _m, why in report.plan.blocked:
        add_row(table, ep, "-", "-", "failed", "", "", why)
    if report.outcomes or report.plan.blocked:
        out.print(table)
    for o in report.outcomes:
        if o.error and (len(o.error) > 80 or "\n" in o.error):
            out.print(f"{o.endpoint}/{o.model}: {o.error}", markup=False)
    for note in report.plan.notes:
        out.print(note, markup=False)


def _print_conversions(report, out: Console) -> None:
    table = Table(title=f"convert {report.plan.deployment_id}")
    for col in ("endpoint", "model", "version", "artifact", "result", "size", "fidelity", "cache entry"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        art = o.artifact or {}
        fid = art.get("fidelity") or {}
        if fid.get("checked"):
            fidelity = "; ".join(
                f"{r['artifact']}: {r['identical']}/{fid['cases']} identical, suite "
                + ("passed" if r["suite_passed"] else "FAILED")
                for r in fid.get("results", [])
            )
        else:
            fidelity = fid.get("reason", "")
        what = " ".join(str(art[k]) for k in ("format", "quant") if art.get(k)) or "PEFT as is"
        size = human_bytes(art["size_bytes"]) if art else ""
        add_row(
            table,
            o.endpoint,
            o.model,
            o.version,
            what,
            o.convert or o.status,
            size,
            o.error or fidelity,
            art.get("dir", ""),
        )
    out.print(table)
