"""Run a Plan's steps, exactly those, journaled per endpoint (DESIGN §5, §9).

Per endpoint: conversions (on this machine, before the lock), then under the endpoint lock: finish
whatever an interrupted command left open in the journal, re-read the facts and compare them with
the ones the plan was made from (a stale plan is planned again, or refused), then run each
transaction: `begin`, `intent`/`done` around every side effect, `commit` — or, when a step after the
swap fails, the transaction's compensation and `abort`. A failing transaction ends only its own
(endpoint, model) pipeline.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapterctl import __version__, locks
from adapterctl.config import Config
from adapterctl.errors import EXIT_FAILURE, AdapterctlError, HealthCheckFailed, LockHeld
from adapterctl.facts import gather
from adapterctl.faults import FAULT_ENV, Faults
from adapterctl.identity import Identity, iso, utc_now
from adapterctl.journal import Journal
from adapterctl.outcome import STATUS_EXIT, Outcome, worst
from adapterctl.plan import (
    EndpointPlan,
    Plan,
    Transaction,
    endpoint_deploy_plan,
    endpoint_rollback_plan,
    plan_recovery,
)
from adapterctl.records import append_log
from adapterctl.steps import RunState, Step, StepContext, Swap
from adapterctl.transports.base import Transport


@dataclass
class RunContext:
    cfg: Config
    transports: dict[str, Transport]
    identity: Identity
    clock: Callable[[], datetime] = utc_now
    progress: Callable[[str], None] = lambda line: None
    break_lock: bool = False
    command: str = ""
    parallel: int = 4
    board: Any = None  # optional live display: .phase(endpoint, text), .advance(endpoint, nbytes)
    allow_outage: bool = False
    health_local: bool = False


@dataclass
class Report:
    plan: Plan
    outcomes: list[Outcome]
    exit_code: int
    dry_run: bool = False


class Executor:
    def __init__(self, plan: Plan, ctx: RunContext):
        self.plan, self.ctx, self.cfg = plan, ctx, ctx.cfg
        self.faults = Faults(os.environ.get(FAULT_ENV))
        self.state = RunState(
            ctx.cfg,
            ctx.identity,
            ctx.clock,
            plan.deployment_id,
            ctx.progress,
            self.faults.wrap_board(ctx.board),
            plan.cycle,
        )
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.failed_models: dict[str, str] = {}
        self.registered: dict[str, threading.Event] = {}
        self.index = {id(s): str(i) for i, s in enumerate(plan.steps)}

    # -- bookkeeping ----------------------------------------------------------------------------
    def outcome(self, endpoint: str, model: str, version: str | None) -> Outcome:
        key = (endpoint, model)
        if key not in self.outcomes:
            out = Outcome(endpoint, model, version)
            if self.plan.kind == "deploy":
                out.phases_completed.append("version")
            self.outcomes[key] = out
        return self.outcomes[key]

    def context(self, endpoint: str, model: str, version: str | None) -> StepContext:
        tr = self.ctx.transports.get(endpoint)
        return StepContext(self.state, endpoint, model, tr, self.outcome(endpoint, model, version))

    def say(self, endpoint: str, text: str) -> None:
        self.ctx.progress(f"[{endpoint}] {text}")

    # -- main loop --------------------------------------------------------------------------------
    def execute(self) -> list[Outcome]:
        """Version steps on one background worker; each endpoint's steps in order, endpoints in parallel.

        An endpoint's transaction for a model waits until that model's version step is done. With a
        canary, its endpoint runs alone first; the others only if every pipeline there succeeded.
        """
        self.registered = {s.model: threading.Event() for s in self.plan.registrations}
        with ThreadPoolExecutor(max_workers=1) as registrar:
            done = [registrar.submit(self.register, s) for s in self.plan.registrations]
            self.run_endpoints()
            for future in done:
                future.result()  # an unexpected error in a version step surfaces here, not silently
        return list(self.outcomes.values())

    def register(self, step: Any) -> None:
        try:
            self.faults.at(self.index[id(step)], "before")
            target = next(t for t in self.plan.targets if t.model == step.model)
            step.run_global(self.state, target)
            self.faults.at(self.index[id(step)], "after")
        except AdapterctlError as exc:
            self.failed_models[step.model] = str(exc)
            self.ctx.progress(f"{step.model}: FAILED in version: {exc}")
        finally:
            self.registered[step.model].set()

    def run_endpoints(self) -> None:
        plans = {e.endpoint: e for e in self.plan.endpoint_plans}
        rest = list(plans)
        canary = self.plan.canary
        if canary in plans:
            rest.remove(canary)
            self.run_endpoint(plans[canary])
            bad = [
                o
                for o in self.outcomes.values()
                if o.endpoint == canary and o.status not in ("success", "noop")
            ]
            if bad:
                why = f"canary {canary} did not pass ({bad[0].status}): this endpoint was not touched"
                for name in rest:
                    for t in plans[name].transactions:
                        o = self.outcome(name, t.model, t.version)
                        o.status, o.error = "skipped", why
                rest = []
        with ThreadPoolExecutor(max_workers=max(1, min(self.ctx.parallel, len(rest) or 1))) as pool:
            list(pool.map(self.run_endpoint, (plans[n] for n in rest)))

    def run_endpoint(self, eplan: EndpointPlan) -> None:
        for step in eplan.converts:
            self.registered.get(step.model, _SET).wait()
            self.run_unjournaled(step)
        if not eplan.locked_steps():
            return
        name, tr = eplan.endpoint, self.ctx.transports[eplan.endpoint]
        ep = self.cfg.endpoints[name]
        lock_key, unlock_key = (self.index.get(id(s), "?") for s in eplan.lock_steps)
        self.faults.at(lock_key, "before")
        holder = locks.holder(self.ctx.identity, self.plan.deployment_id, self.ctx.command, self.ctx.clock())
        try:
            locks.acquire(
                tr,
                ep,
                holder,
                self.ctx.identity,
                self.ctx.break_lock,
                self.cfg.lock_stale_after_s,
                lambda text: self.say(name, text),
                self.log_line,
            )
        except AdapterctlError as exc:
            self.say(name, f"FAILED: {exc}")
            self.end_all(eplan, "locked" if isinstance(exc, LockHeld) else "failed", str(exc))
            return
        try:
            self.faults.at(lock_key, "after")
            self.run_locked(eplan, tr)
        except AdapterctlError as exc:  # the journal or the facts could not be read: the endpoint is gone
            self.say(name, f"FAILED: {exc}")
            self.end_all(eplan, "failed", str(exc))
        finally:
            self.faults.at(unlock_key, "before")
            try:
                locks.release(tr, ep, self.plan.deployment_id)
            except AdapterctlError as exc:
                self.say(name, f"could not release the lock: {exc}")
            self.faults.at(unlock_key, "after")

    def end_all(self, eplan: EndpointPlan, status: str, why: str) -> None:
        for t in eplan.transactions:
            o = self.outcome(eplan.endpoint, t.model, t.version)
            if not o.done:
                o.status, o.error = status, why

    def run_locked(self, eplan: EndpointPlan, tr: Transport) -> None:
        """Under the lock: finish an interrupted transaction, re-check the facts, run the transactions."""
        ep = self.cfg.endpoints[eplan.endpoint]
        models = sorted(eplan.facts.models)
        journal = Journal(tr, ep.adapter_dir, self.ctx.clock)
        fresh = gather(ep, tr, models)
        skip: set[tuple[str, str]] = set()
        recovery = plan_recovery(self.cfg, ep, fresh, self.ctx.allow_outage)
        foreseen = False
        if recovery is not None:
            planned = eplan.recovery
            foreseen = planned is not None and planned.txn == recovery.txn
            recovery = planned if foreseen else recovery
            if self.run_txn(recovery, journal) == "rolled_back" or recovery.state.action == "complete":
                skip.add((recovery.model, recovery.version))
            fresh = gather(ep, tr, models)
        if fresh.basis() != eplan.facts.basis():
            eplan = self.replan(eplan, ep, fresh, foreseen, skip)
            if eplan is None:
                return
        for txn in eplan.transactions:
            self.registered.get(txn.model, _SET).wait()
            out = self.outcome(txn.endpoint, txn.model, txn.version)
            if txn.model in self.failed_models and not out.done:
                out.status, out.error = "failed", self.failed_models[txn.model]
            if not out.done:
                self.run_txn(txn, journal)

    def replan(
        self, eplan: EndpointPlan, ep: Any, fresh: Any, foreseen: bool, skip: set
    ) -> EndpointPlan | None:
        """The endpoint changed since planning: plan it again with the same functions (a deploy, or a
        rollback whose plan foresaw the recovery), or refuse a stale rollback (exit 3)."""
        changes = fresh.changes_since(eplan.facts) or ["an interrupted command was finished"]
        if self.plan.kind != "deploy" and not foreseen:
            why = (
                f"endpoint {ep.name} changed since the plan was made ({'; '.join(changes)}): "
                "refusing to apply a stale plan — run the command again"
            )
            self.say(ep.name, why)
            self.end_all(eplan, "stale", why)
            return None
        self.say(
            ep.name, f"the endpoint changed since the plan was made ({'; '.join(changes)}): planned again"
        )
        notes: list[str] = []
        try:
            if self.plan.kind == "deploy":
                targets = [t for t in self.plan.targets if ep.serves(t.model)]
                new = endpoint_deploy_plan(
                    self.cfg,
                    ep,
                    fresh,
                    targets,
                    notes,
                    self.ctx.allow_outage,
                    self.ctx.health_local,
                    skip=frozenset(skip),
                )
            else:
                models = [t.model for t in eplan.transactions if (t.model, t.version) not in skip]
                new = endpoint_rollback_plan(
                    self.cfg,
                    ep,
                    fresh,
                    models,
                    self.plan.rollback_to or "previous",
                    self.ctx.allow_outage,
                    notes,
                )
        except AdapterctlError as exc:
            self.say(ep.name, f"FAILED: {exc}")
            self.end_all(eplan, "failed", str(exc))
            return None
        for note in notes:
            self.say(ep.name, note)
        for step in new.converts:  # the same conversions: found in this run's artifacts
            self.run_unjournaled(step)
        return new

    # -- transactions -------------------------------------------------------------------------------
    def run_unjournaled(self, step: Step) -> None:
        """A step with no side effect on the endpoint (a conversion): failure ends its pipeline."""
        ctx = self.context(step.endpoint, step.model, step.version)
        if ctx.outcome.done or step.model in self.failed_models:
            if step.model in self.failed_models and not ctx.outcome.done:
                ctx.outcome.status, ctx.outcome.error = "failed", self.failed_models[step.model]
            return
        try:
            self.run_step(step, ctx, None, None)
        except AdapterctlError as exc:
            self.fail(ctx, step, exc, None, None)

    def run_txn(self, txn: Transaction, journal: Journal) -> str:
        """Run one transaction's steps; compensate when a step after the swap fails. Returns the status."""
        ctx = self.context(txn.endpoint, txn.model, txn.version)
        recovering = txn.kind == "recover"
        if recovering:
            ctx.outcome.recovered = txn.state.text
            ctx.say(f"finishing an interrupted command: {txn.state.text}")
            if txn.state.action == "compensate":
                return self.compensate(txn, ctx, journal, None, journaled=False)
        else:
            journal.append(txn.begin_record(self.plan.deployment_id, self.ctx.command))
        swapped = recovering and txn.state.action == "roll-forward"
        for step in txn.steps:
            try:
                self.run_step(step, ctx, journal, txn)
            except AdapterctlError as exc:
                if swapped and txn.compensation:
                    ctx.say(f"FAILED in {step.phase}: {exc}")
                    return self.compensate(txn, ctx, journal, exc)
                return self.fail(ctx, step, exc, journal, txn)
            swapped = swapped or (isinstance(step, Swap) and txn.kind == "deploy")
        ends_open = recovering and txn.state.action in ("abandon", "undo-swap")
        journal.append({"t": "abort" if ends_open else "commit", "txn": txn.txn})
        if ends_open and not txn.steps:
            ctx.outcome.phases_completed.append("recover")
        return ctx.outcome.status

    def run_step(
        self, step: Step, ctx: StepContext, journal: Journal | None, txn: Transaction | None, comp: str = ""
    ) -> None:
        key = comp or self.index.get(id(step), "?")
        self.faults.at(key, "before")
        if self.state.board is not None:
            self.state.board.phase(ctx.endpoint, f"{ctx.model} {step.phase}")
        if journal is not None and step.journaled:
            journal.append({"t": "intent", "txn": txn.txn, "action": step.action, "comp": bool(comp)})
        step.run(ctx)
        if journal is not None and step.journaled:
            journal.append({"t": "done", "txn": txn.txn, "action": step.action, "comp": bool(comp)})
        if step.phase not in ctx.outcome.phases_completed and step.phase not in ("lock", "prune"):
            ctx.outcome.phases_completed.append(step.phase)
        self.faults.at(key, "after")

    def fail(self, ctx: StepContext, step: Step, exc: AdapterctlError, journal: Journal | None, txn) -> str:
        out = ctx.outcome
        out.error = str(exc)
        if isinstance(exc, HealthCheckFailed):
            out.status = "aborted"
            ctx.say(f"ABORTED, active untouched: {exc.message}")
            ctx.status_update(
                {
                    "last_aborted": {
                        "version": step.version,
                        "reason": exc.message,
                        "at": iso(self.ctx.clock()),
                    }
                }
            )
        else:
            out.status = "failed"
            ctx.say(f"FAILED in {step.phase}: {exc}")
        if journal is not None and txn is not None:
            # if the link is gone, the next command finds the transaction open and closes it
            with contextlib.suppress(AdapterctlError):
                journal.append({"t": "abort", "txn": txn.txn, "why": out.error[:500]})
        return out.status

    def compensate(
        self,
        txn: Transaction,
        ctx: StepContext,
        journal: Journal,
        exc: AdapterctlError | None,
        journaled=True,
    ) -> str:
        """Undo an activation whose verify (or reload) failed: swap back, reload, confirm — journaled,
        so a kill in here is finished by the next command. A failed compensation leaves it open."""
        out = ctx.outcome
        first = txn.compensation[0] if txn.compensation else None
        restore = (first.active, first.previous) if isinstance(first, Swap) else txn.restore
        why = str(exc) if exc is not None else "the interrupted command's verify failed"
        if journaled:
            journal.append({"t": "compensate", "txn": txn.txn, "why": why[:500]})
        ctx.say(
            f"rolling back by itself: active → {restore[0] or '(none)'}, previous → {restore[1] or '(none)'}"
        )
        steps = txn.compensation if txn.kind != "recover" or txn.state.action != "compensate" else txn.steps
        try:
            for j, step in enumerate(steps):
                self.run_step(step, ctx, journal, txn, comp=f"c{j}")
        except AdapterctlError as exc2:
            out.status = "failed"
            out.error = f"{why}; ROLLBACK ALSO FAILED: {exc2}"
            ctx.status_update({"health_status": "rollback_failed", "last_error": out.error})
            ctx.say(f"ROLLBACK FAILED: {exc2} — inspect the endpoint now; the next command retries it")
            return out.status
        journal.append({"t": "abort", "txn": txn.txn, "why": "rolled back: " + why[:480]})
        out.status, out.error = "rolled_back", out.error or why
        out.phases_completed.append("rollback")
        ctx.status_update(
            {"health_status": "rolled_back", "last_failed_version": txn.version, "last_error": why}
        )
        ctx.say(f"ROLLED BACK to {restore[0] or '(no adapter)'}")
        return out.status

    # -- records --------------------------------------------------------------------------------------
    def log_line(self, record: dict[str, Any]) -> None:
        append_log(
            self.cfg.store,
            dict(
                record,
                timestamp=iso(self.ctx.clock()),
                deployment_id=self.plan.deployment_id,
                user=self.ctx.identity.user,
                adapterctl_version=__version__,
            ),
        )


_SET = threading.Event()  # what a model with no version step in this run waits on: already set
_SET.set()


def execute(plan: Plan, ctx: RunContext) -> Report:
    """Run every step of `plan`; write one log line per (endpoint, model) and the deployment record."""
    from adapterctl.records import record_run

    run = Executor(plan, ctx)
    outcomes = run.execute()
    code = worst([STATUS_EXIT[o.status] for o in outcomes] + [EXIT_FAILURE] * bool(run.failed_models))
    record_run(plan, ctx, outcomes, code, run.log_line, bool(run.failed_models))
    return Report(plan, outcomes, code)
