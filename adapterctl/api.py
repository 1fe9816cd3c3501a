"""The importable verbs behind every command (STYLE: sqlite-utils). The CLI only parses and prints."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from adapterctl.config import (
    ROLLBACK_TARGETS,
    Config,
    _suggest,
    check_deploy_options,
    check_parallel,
    check_rollback_target,
    split_names,
)
from adapterctl.errors import EXIT_FAILURE, AdapterctlError, ConfigError, UsageError, VersionConflict
from adapterctl.execute import Report, RunContext, execute
from adapterctl.facts import gather
from adapterctl.identity import Identity, iso, utc_now
from adapterctl.manifest import Manifest
from adapterctl.names import check_cycle, check_version_id
from adapterctl.outcome import worst
from adapterctl.plan import Plan, Target, consent_missing, plan_deploy, plan_rollback
from adapterctl.registration import register_version
from adapterctl.transports import open_transport
from adapterctl.transports.base import Transport
from adapterctl.versioning import check_existing, inspect_adapter, newest_adapter, version_id

__all__ = ["split_names", "register_version", "deploy", "rollback", "convert_versions", "status", "read_log"]


def select_endpoints(cfg: Config, names: list[str]) -> list[str]:
    if not names:
        raise UsageError(
            "no endpoints selected",
            f"use --endpoints NAME... or --endpoints all (known: {', '.join(cfg.endpoints) or 'none'})",
        )
    if names == ["all"]:
        return list(cfg.endpoints)
    return [cfg.endpoint(n).name for n in names]


def new_deployment_id(clock: Callable[[], datetime]) -> str:
    return f"{clock():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _target_from_source(cfg: Config, manifest: Manifest, model: str, cycle: int, clock) -> Target:
    src = newest_adapter(cfg.models[model].source)
    info = inspect_adapter(src)
    existing = manifest.by_sha(model, info.sha256)
    check_existing(model, existing, info)
    if existing:
        return _target_from_entry(cfg, model, existing)
    vid = version_id(cycle, clock(), info.sha256)
    clash = manifest.version(model, vid)
    if clash:
        raise VersionConflict(f"model {model}: {vid} is already registered with other bytes")
    return Target(
        model, vid, info.files, info.size_bytes, cfg.store / model / vid, source=src, cycle=cycle, info=info
    )


def _target_from_entry(cfg: Config, model: str, entry: dict[str, Any]) -> Target:
    store_dir = cfg.store / model / entry["version_id"]
    if not store_dir.is_dir():
        raise UsageError(
            f"model {model}: {entry['version_id']} is in the manifest but {store_dir} is missing",
            "register the adapter again from its source",
        )
    return Target(
        model, entry["version_id"], entry["files"], entry["size_bytes"], store_dir, cycle=entry.get("cycle")
    )


def resolve_targets(
    cfg: Config, models: list[str], cycle: int | None, version: str | None, clock
) -> list[Target]:
    """What to deploy, without writing: newest source adapter per model (--cycle) or --version."""
    manifest = Manifest.load(cfg.store)
    if cycle is not None:
        check_cycle(cycle)
    if version is not None:
        check_version_id(version)
        owners = [m for m in (models or manifest.model_of(version)) if manifest.version(m, version)]
        if not owners:
            known = [
                v["version_id"] for m in models or manifest.data["versions"] for v in manifest.versions(m)
            ]
            raise UsageError(
                f"version {version} is not registered{' for ' + ', '.join(models) if models else ''}"
                + _suggest(version, known),
                "see `adapterctl versions`",
            )
        return [_target_from_entry(cfg, m, manifest.require_version(m, version)) for m in owners]
    if cycle is None:
        raise UsageError(
            "say what to deploy: --cycle N (register the newest adapter of each model) "
            "or --version VERSION_ID"
        )
    if not models:
        raise UsageError("no models selected", "use --models NAME... or --all-adapters")
    return [_target_from_source(cfg, manifest, m, cycle, clock) for m in models]


def _check_health_config(
    cfg: Config, models: Iterable[str], endpoints: Iterable[str] = (), here: bool = False
) -> None:
    """Load every suite and engine a run will need, so a bad one stops it before anything is written.

    A program that runs on this machine (local endpoints; every pre-check with `here`, i.e.
    --health-local) must be found here; on an SSH endpoint it is not looked for (no connection yet).
    """
    from adapterctl.health import make_engine, resolve_suite
    from adapterctl.health.command import CommandEngine
    from adapterctl.plan import health_spec_on

    eps = [cfg.endpoints[e] for e in endpoints]
    for m in models:
        spec = cfg.models[m].health
        if spec is not None and spec.suite != "none":
            resolve_suite(spec.suite, cfg.path.parent)
            for ep in [e for e in eps if e.serves(m)] or [None]:
                if ep is None:
                    if spec.engine != "auto":
                        make_engine(asdict(spec))
                    continue
                engine = make_engine(health_spec_on(cfg.models[m], ep))
                if not (ep.is_local or here):
                    continue
                key = "command" if type(engine) is CommandEngine else "python"
                if isinstance(engine, CommandEngine):
                    _check_program(cfg, m, ep.name, key, engine.argv_template, spec.env)
                if spec.base_command and ep.is_local:
                    _check_program(cfg, m, ep.name, "base_command", spec.base_command, spec.env)


def _check_program(cfg: Config, model: str, ep: str, key: str, argv: Iterable[str], env: dict) -> None:
    """A health program that would run on this machine must exist here (PATH as the command gets it)."""
    prog = next(iter(argv))
    if "{" in prog:  # e.g. {release}/run.sh: it exists only once the release does
        return
    path = {**os.environ, **env}.get("PATH", os.defpath)
    if shutil.which(prog, path=path) is None:
        where = "not an executable file" if os.sep in prog else "not found on PATH"
        raise ConfigError(
            f"{cfg.path}: models.{model}.health.{key}: program {prog!r} is {where} on this machine "
            f"(it runs here for endpoint {ep}); nothing was registered or written",
            f"install it, or give its absolute path in models.{model}.health.{key}",
        )


def _refuse_missing_parents(cfg: Config, facts: dict[str, Any]) -> None:
    """adapter_dir is created by the first deploy, its parent never: a missing parent is a typo or an
    endpoint not set up yet, and both are refused before anything is written."""
    missing = [
        n
        for n, f in facts.items()
        if not isinstance(f, AdapterctlError) and not f.problem and not f.parent_exists
    ]
    if not missing:
        return
    eps = [cfg.endpoints[n] for n in missing]
    parents = [os.path.dirname(ep.adapter_dir) for ep in eps]
    what = "; ".join(
        f"endpoint {ep.name}: the parent {p} of adapter_dir {ep.adapter_dir} does not exist"
        + ("" if ep.is_local else f" on {ep.host}")
        for ep, p in zip(eps, parents, strict=True)
    )
    fix = "; ".join(
        f"mkdir -p {shlex.quote(p)}" + ("" if ep.is_local else f" on {ep.host}")
        for ep, p in zip(eps, parents, strict=True)
    )
    raise UsageError(
        f"{what} (a typo in adapter_dir?); it is never created, nothing was written",
        f"fix adapter_dir in {cfg.path}, or create the directory: {fix}",
    )


@dataclass
class Session:
    """Transports opened for one command, closed together."""

    cfg: Config
    transports: dict[str, Transport]

    @classmethod
    def open(cls, cfg: Config, endpoints: list[str], ssh: Any = None) -> Session:
        return cls(cfg, {n: open_transport(cfg.endpoints[n], ssh) for n in endpoints})

    def facts(self, models_of: Callable[[str], list[str]], parallel: int = 8) -> dict[str, Any]:
        """Every endpoint's facts, read in parallel; an unreachable endpoint yields its error."""
        from concurrent.futures import ThreadPoolExecutor

        def one(name: str) -> Any:
            try:
                return gather(self.cfg.endpoints[name], self.transports[name], models_of(name))
            except AdapterctlError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            return dict(zip(self.transports, pool.map(one, self.transports), strict=True))

    def close(self) -> None:
        for tr in self.transports.values():
            with contextlib.suppress(Exception):
                tr.close()


@dataclass
class RunOptions:
    """How a deploy or rollback runs: everything except what goes where."""

    dry_run: bool = False
    break_lock: bool = False
    parallel: int = 4
    ssh: Any = None  # transports.ssh.SSHOptions
    clock: Callable[[], datetime] = utc_now
    identity: Identity | None = None
    progress: Callable[[str], None] = lambda line: None
    on_plan: Callable[[Plan], None] = lambda plan: None  # called before a real run executes it
    board: Any = None  # live progress display, see cli.ProgressBoard
    command: str = ""
    allow_outage: bool = False  # consent to reload_method restart (the service is down 10–20 s)
    health_local: bool = False  # run the pre-activation health check here, on the store copy


def _plan_and_run(
    cfg: Config,
    eps: list[str],
    models_of: Callable[[str], list[str]],
    build: Callable[[dict[str, Any]], Plan],
    opts: RunOptions,
) -> Report:
    """Read every endpoint's facts, build the plan from them, then print it or execute exactly it."""
    check_parallel(opts.parallel)
    session = Session.open(cfg, eps, opts.ssh)
    try:
        plan = build(session.facts(models_of, opts.parallel))
        blocked = EXIT_FAILURE if plan.blocked else 0
        if opts.dry_run:
            return Report(plan, [], blocked, dry_run=True)
        refused = consent_missing(plan)
        if refused:
            raise UsageError(
                f"{', '.join(refused)}: reload_method restart stops the service "
                "(expected outage 10–20 s); refusing without consent, nothing was changed",
                "rerun with --allow-outage, or set allow_outage: true for the endpoint in adapterctl.yaml",
            )
        opts.on_plan(plan)
        ctx = RunContext(
            cfg,
            session.transports,
            opts.identity or Identity.current(),
            opts.clock,
            opts.progress,
            opts.break_lock,
            opts.command,
            opts.parallel,
            opts.board,
            opts.allow_outage,
            opts.health_local,
        )
        report = execute(plan, ctx)
        report.exit_code = worst([report.exit_code, blocked])
        return report
    finally:
        session.close()


def deploy(
    cfg: Config,
    *,
    models: list[str],
    endpoints: list[str],
    cycle: int | None = None,
    version: str | None = None,
    canary: str | None = None,
    opts: RunOptions | None = None,
) -> Report:
    """Plan a deploy and, unless dry_run, execute exactly that plan. Raises UsageError & co."""
    opts = opts or RunOptions()
    check_deploy_options(cycle, version, opts.parallel)
    models = [cfg.model(m).name for m in models]
    eps = select_endpoints(cfg, endpoints)
    if canary is not None and canary not in eps:
        chosen = ", ".join(eps)
        raise UsageError(
            f"--canary {canary} is not one of the selected endpoints ({chosen}){_suggest(canary, eps)}"
        )
    targets = resolve_targets(cfg, models, cycle, version, opts.clock)
    if not any(cfg.endpoints[e].serves(t.model) for t in targets for e in eps):
        raise UsageError(
            f"none of the selected endpoints ({', '.join(eps)}) serves {', '.join(t.model for t in targets)}",
            "check `models:` of those endpoints",
        )
    _check_health_config(cfg, [t.model for t in targets], eps, opts.health_local)
    return _plan_and_run(
        cfg,
        eps,
        lambda e: [t.model for t in targets if cfg.endpoints[e].serves(t.model)],
        lambda facts: (
            _refuse_missing_parents(cfg, facts)
            or plan_deploy(
                cfg,
                new_deployment_id(opts.clock),
                targets,
                facts,
                cycle=cycle,
                canary=canary,
                allow_outage=opts.allow_outage,
                health_local=opts.health_local,
            )
        ),
        opts,
    )


def convert_versions(
    cfg: Config,
    *,
    models: list[str],
    endpoints: list[str],
    version: str | None = None,
    opts: RunOptions | None = None,
) -> Report:
    """`adapterctl convert`: the convert phase alone for registered versions (default: each model's
    newest) and the selected endpoints' kinds. Needs no endpoint connection; records artifacts in
    the manifest, writes no deploy log line."""
    from adapterctl.plan import plan_convert

    opts = opts or RunOptions()
    eps = select_endpoints(cfg, endpoints or ["all"])
    names = [cfg.model(m).name for m in models]
    if version is not None:
        targets = resolve_targets(cfg, names, None, version, opts.clock)
    else:
        manifest = Manifest.load(cfg.store)
        targets = []
        for m in names:
            entry = manifest.newest(m)
            if entry is None:
                raise UsageError(
                    f"model {m} has no registered version to convert",
                    f"register one first: adapterctl register --model {m} --cycle N (or deploy --cycle N)",
                )
            targets.append(_target_from_entry(cfg, m, entry))
    plan = plan_convert(cfg, new_deployment_id(opts.clock), targets, eps)
    if not plan.steps:
        raise UsageError(f"none of the selected endpoints ({', '.join(eps)}) serves {', '.join(names)}")
    if opts.dry_run:
        return Report(plan, [], 0, dry_run=True)
    opts.on_plan(plan)
    ctx = RunContext(
        cfg, {}, opts.identity or Identity.current(), opts.clock, opts.progress, command=opts.command
    )
    return execute(plan, ctx)


def prune_conversions(cfg: Config, dry_run: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """Remove conversion cache entries not used by the newest `keep_releases` versions of each model
    (as recorded in the manifest). Returns (removed (name, bytes), kept keys)."""
    from adapterctl.convert import Cache

    manifest = Manifest.load(cfg.store)
    keep: set[str] = set()
    for model in manifest.data["versions"]:
        for entry in manifest.versions(model)[-cfg.keep_releases :]:
            keep.update(entry.get("artifacts", {}))
    return Cache(cfg.store).prune(keep, dry_run), sorted(keep)


def rollback(
    cfg: Config,
    *,
    endpoints: list[str],
    models: list[str],
    to: str = "previous",
    opts: RunOptions | None = None,
) -> Report:
    """Swap `active` back (to previous, last-good, a VERSION, or base: no adapter) and reload.

    Raises UsageError.
    """
    opts = opts or RunOptions()
    check_parallel(opts.parallel)
    check_rollback_target(to)
    eps = select_endpoints(cfg, endpoints)
    manifest = Manifest.load(cfg.store)  # a corrupt manifest stops the rollback before any endpoint changes
    chosen = [cfg.model(m).name for m in models] or list(cfg.models)
    if to not in ROLLBACK_TARGETS and not any(manifest.version(m, to) for m in chosen):
        known = [v["version_id"] for m in chosen for v in manifest.versions(m)]
        raise UsageError(
            f"--to {to}: no such version of {', '.join(chosen)} in the manifest{_suggest(to, known)}",
            "see `adapterctl versions`, or use --to previous | last-good | base",
        )
    pairs = [(e, m) for e in eps for m in chosen if cfg.endpoints[e].serves(m)]
    if not pairs:
        raise UsageError("nothing to roll back: the selected endpoints serve none of the selected models")

    def build(facts: dict[str, Any]) -> Plan:
        for f in facts.values():
            if isinstance(f, AdapterctlError):
                raise f
        chosen_pairs = pairs
        if models == [] and to in ("previous", "base"):
            # with no --models, roll back only the models that have something to roll back to
            slot = "previous" if to == "previous" else "active"
            chosen_pairs = [(e, m) for e, m in pairs if getattr(facts[e].models[m], slot)] or pairs
        return plan_rollback(
            cfg, new_deployment_id(opts.clock), chosen_pairs, facts, to, allow_outage=opts.allow_outage
        )

    return _plan_and_run(cfg, eps, lambda e: [m for (ep, m) in pairs if ep == e], build, opts)


def status(cfg: Config, endpoints: list[str], ssh: Any = None) -> list[dict[str, Any]]:
    """Live state per (endpoint, model) with drift between links, status.json and the manifest."""
    eps = select_endpoints(cfg, endpoints or ["all"])
    manifest = Manifest.load(cfg.store)
    rows: list[dict[str, Any]] = []
    session = Session.open(cfg, eps, ssh)
    try:
        facts = session.facts(lambda e: [m for m in cfg.models if cfg.endpoints[e].serves(m)])
    finally:
        session.close()
    from adapterctl.journal import state_of

    for name, f in facts.items():
        ep = cfg.endpoints[name]
        if isinstance(f, AdapterctlError):
            rows.append({"endpoint": name, "model": None, "kind": ep.kind, "error": str(f)})
            continue
        for model, mf in f.models.items():
            st = f.model_status(model)
            drift = []
            if st and st.get("active_version") != mf.active:
                drift.append(
                    f"status.json says active {st.get('active_version')}, link points at {mf.active}"
                )
            if mf.active and mf.active != "?" and not manifest.version(model, mf.active):
                drift.append(f"{mf.active} is not in the manifest")
            if f.status_error:
                drift.append(f.status_error)
            open_txn = f.journal if f.journal and f.journal.begin.get("model") == model else None
            pending = state_of(open_txn, mf) if open_txn else None
            health = st.get("health_status")
            if pending is not None:  # a command stopped mid-transaction: say so, and what the next one does
                health = f"interrupted ({pending.name})"
            elif mf.broken:  # whatever status.json says, `active` serves nothing complete
                health = "broken"
                drift.append(
                    f"`active` points at {mf.active}, not a complete release there: deploy a version, or "
                    "rollback --to VERSION|base"
                )
            active = mf.release(mf.active)
            rows.append(
                {
                    "endpoint": name,
                    "model": model,
                    "kind": ep.kind,
                    "reload_method": ep.reload_method,
                    "active": mf.active,
                    "active_format": " ".join(x for x in (active.format, active.quant) if x)
                    if active
                    else None,
                    "previous": mf.previous,
                    "releases": [r.version_id for r in mf.releases],
                    "health_status": health,
                    "last_good_version": st.get("last_good_version"),
                    "last_reload": st.get("last_reload"),
                    "drift": drift,
                    "pending": f"next command: {pending.text}" if pending else None,
                    "locked_by": (f.lock.holder or {}).get("deployment_id") if f.lock else None,
                    "lock_problem": f.lock.describe(f"{ep.adapter_dir}/.adapterctl.lock")
                    if f.lock and f.lock.state != "held"
                    else None,
                    "error": None,
                }
            )
    return rows


def read_log(cfg: Config, endpoint: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The last `limit` lines of deploy_log.jsonl (optionally of one endpoint); bad lines are reported."""
    import json

    path = cfg.store / "deploy_log.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            rec = {"action": "?", "status": "unreadable", "error": f"{path}:{n}: {exc.msg}"}
        if endpoint is None or rec.get("endpoint") == endpoint:
            rows.append(rec)
    return rows[-limit:] if limit else rows


def gc(
    cfg: Config, endpoints: list[str], ssh: Any = None, dry_run: bool = False, opts: RunOptions | None = None
) -> tuple[list[Any], list[tuple[str, str]]]:
    """Remove what interrupted commands left: here (store temp copies, conversion scratch dirs, SSH
    control dirs of dead runs) and on each endpoint, under its lock (staging no open transaction will
    reuse, temp links and files). Returns (what was removed — or would be, with dry_run — and
    (endpoint, error) for endpoints that could not be cleaned)."""
    from adapterctl import hygiene, locks
    from adapterctl.records import append_log

    opts = opts or RunOptions()
    identity = opts.identity or Identity.current()
    items = hygiene.local_leftovers(cfg.store)
    if not dry_run:
        items = hygiene.remove_local(items)
    errors: list[tuple[str, str]] = []
    eps = select_endpoints(cfg, endpoints or ["all"])
    gc_id = new_deployment_id(opts.clock)
    log = lambda rec: append_log(  # noqa: E731
        cfg.store, dict(rec, deployment_id=gc_id, user=identity.user, timestamp=iso(opts.clock()))
    )
    session = Session.open(cfg, eps, ssh)
    try:
        for name in eps:
            ep, tr = cfg.endpoints[name], session.transports[name]
            models = [m for m in cfg.models if ep.serves(m)]
            try:
                if not dry_run:
                    holder = locks.holder(identity, gc_id, opts.command or "adapterctl gc", opts.clock())
                    locks.acquire(
                        tr, ep, holder, identity, opts.break_lock, cfg.lock_stale_after_s, opts.progress, log
                    )
                try:
                    open_txn = tr.call("journal_open", adapter_dir=ep.adapter_dir)
                    keep = [open_txn[0].get("version")] if open_txn else []  # the next deploy resumes it
                    op = "leftovers" if dry_run else "remove_leftovers"
                    found = tr.call(op, adapter_dir=ep.adapter_dir, models=models, keep=keep)
                finally:
                    if not dry_run:
                        locks.release(tr, ep, gc_id)
                items += [hygiene.Leftover(name, x["path"], x["bytes"], x["what"]) for x in found]
            except AdapterctlError as exc:
                errors.append((name, str(exc)))
    finally:
        session.close()
    if not dry_run:
        log(
            {
                "action": "gc",
                "status": "failed" if errors else "success",
                "removed": len(items),
                "bytes": sum(i.bytes for i in items),
                "errors": dict(errors),
            }
        )
    return items, errors
