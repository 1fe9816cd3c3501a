"""What a command leaves on the training box: one deploy_log.jsonl line per (endpoint, model) and
the deployment's record in manifest.json."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from adapterctl.identity import iso
from adapterctl.outcome import Outcome


def append_log(store: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to deploy_log.jsonl with a single write(2)."""
    store.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode()
    fd = os.open(store / "deploy_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def record_run(
    plan: Any,
    ctx: Any,
    outcomes: list[Outcome],
    code: int,
    log: Callable[[dict[str, Any]], None],
    failed: bool,
) -> None:
    """Log every outcome; record the deployment (and the endpoints it used) in the manifest."""
    from adapterctl.manifest import locked

    for o in outcomes:
        log(
            {
                "action": plan.kind,
                "cycle": plan.cycle,
                "models": [o.model],
                "model": o.model,
                "version": o.version,
                "endpoint": o.endpoint,
                "phases_completed": o.phases_completed,
                "health_check_results": o.health,
                "status": o.status,
                "error": o.error,
                "bytes_sent": o.bytes_sent,
                "convert": o.convert,
                "recovered": o.recovered,
                "duration_s": round(time.monotonic() - o.started, 3),
            }
        )
    if plan.kind == "convert" or not (outcomes or failed):
        return
    with locked(ctx.cfg.store) as manifest:
        for name in plan.endpoints:
            ep = ctx.cfg.endpoints[name]
            manifest.data["endpoints"][name] = {
                k: asdict(v) if is_dataclass(v) else v for k, v in vars(ep).items() if v not in (None, {}, ())
            }
        manifest.add_deployment(
            {
                "id": plan.deployment_id,
                "timestamp": iso(ctx.clock()),
                "kind": plan.kind,
                "cycle": plan.cycle,
                "models": sorted({o.model for o in outcomes}),
                "endpoints": sorted({o.endpoint for o in outcomes}),
                "status": {0: "success", 4: "aborted", 5: "rolled_back"}.get(code, "failed"),
                "results": {
                    f"{o.endpoint}/{o.model}": {"version": o.version, "status": o.status, "error": o.error}
                    for o in outcomes
                },
                "health_check_results": {f"{o.endpoint}/{o.model}": o.health for o in outcomes if o.health},
            }
        )
