"""Facts in, frozen steps out (STYLE: pyinfra). `--dry-run` prints a Plan; a real run executes it.

Nothing in this module writes anything: it reads the manifest, the adapter sources and the endpoints'
typed facts, and returns data. A plan holds, per endpoint, transactions: each one's forward steps
and its compensation (what runs when verify fails), decided here and shown by `--dry-run`. The
executor runs exactly these steps; under the endpoint lock it re-reads the facts and, if they
changed, plans that endpoint again with the same functions (never a second code path).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from adapterctl.config import Config, EndpointConfig, HealthSpec
from adapterctl.errors import AdapterctlError, UsageError
from adapterctl.facts import EndpointFacts, ModelFacts, compat_link_paths
from adapterctl.faults import FAULT_ENV
from adapterctl.journal import TxnState, new_txn_id, state_of
from adapterctl.reload import ReloadDriver, driver_for
from adapterctl.steps import (
    LIVE_ENGINES,
    CheckService,
    CompatLink,
    Convert,
    HealthCheck,
    HealthPlan,
    Lock,
    MarkGood,
    Prune,
    Publish,
    Register,
    Reload,
    RememberBaseGguf,
    Step,
    Swap,
    Transfer,
    Unlock,
    Verify,
    VerifyRelease,
    frozen_files,
    human_bytes,
)

__all__ = ["Plan", "Target", "Transaction", "EndpointPlan", "human_bytes", "plan_deploy", "plan_rollback"]


@dataclass(frozen=True)
class Target:
    """A model version to deploy: registered already, or registered by a `version` step."""

    model: str
    version_id: str
    files: Mapping[str, str]
    size_bytes: int
    store_dir: Path
    source: Path | None = None  # set when the version step must register it first
    cycle: int | None = None
    info: Any = None  # versioning.AdapterInfo from planning, reused by the version step


@dataclass(frozen=True)
class Transaction:
    """One (endpoint, model) change: forward steps, and the compensation that runs if a step after the
    swap fails (deploy) — both decided at plan time. `begin` is what the journal's begin record says:
    the links before, the target, and where a compensation returns."""

    endpoint: str
    model: str
    version: str | None
    kind: str  # deploy | rollback | recover
    steps: tuple[Step, ...]
    compensation: tuple[Step, ...] = ()
    before: tuple[str | None, str | None] = (None, None)  # (active, previous) when planned
    target: tuple[str | None, str | None] = (None, None)
    restore: tuple[str | None, str | None] = (None, None)
    txn: str = field(default_factory=new_txn_id)
    state: TxnState | None = None  # recover: the interrupted transaction's state

    def begin_record(self, deployment_id: str, command: str) -> dict[str, Any]:
        pair = lambda p: {"active": p[0], "previous": p[1]}  # noqa: E731
        return {
            "t": "begin",
            "txn": self.txn,
            "kind": self.kind,
            "deployment_id": deployment_id,
            "command": command,
            "model": self.model,
            "version": self.version,
            "before": pair(self.before),
            "target": pair(self.target),
            "restore": pair(self.restore),
        }

    def compensation_text(self) -> str:
        return "; ".join(s.describe() for s in self.compensation)


@dataclass(frozen=True)
class EndpointPlan:
    """Everything one endpoint gets: conversions (before the lock), then its transactions under the lock."""

    endpoint: str
    converts: tuple[Convert, ...]
    transactions: tuple[Transaction, ...]
    facts: EndpointFacts = field(compare=False, hash=False)
    recovery: Transaction | None = None

    @cached_property
    def lock_steps(self) -> tuple[Lock, Unlock]:
        """The lock and unlock steps, made once so the executor finds them by identity in plan.steps."""
        return Lock(self.endpoint, None, None, adapter_dir=self.adapter_dir), Unlock(
            self.endpoint, None, None
        )

    def locked_steps(self) -> list[Step]:
        if not self.transactions and self.recovery is None:
            return []
        body = [s for t in ((self.recovery,) if self.recovery else ()) + self.transactions for s in t.steps]
        lock, unlock = self.lock_steps
        return [lock, *body, unlock]

    @property
    def adapter_dir(self) -> str:
        return self.facts.adapter_dir

    @property
    def steps(self) -> list[Step]:
        return [*self.converts, *self.locked_steps()]


@dataclass(frozen=True)
class Plan:
    kind: str  # deploy | rollback | convert
    deployment_id: str
    registrations: tuple[Register, ...]
    endpoint_plans: tuple[EndpointPlan, ...]
    notes: tuple[str, ...] = ()  # per endpoint/model lines that need no step ("already active")
    blocked: tuple[tuple[str, str | None, str], ...] = ()  # (endpoint, model, why) that cannot run
    endpoints: tuple[str, ...] = ()
    targets: tuple[Target, ...] = field(default=())
    cycle: int | None = None
    canary: str | None = None  # this endpoint runs first, through verify; the rest only if it passed
    rollback_to: str | None = None  # rollback: what --to asked for (planned again under the lock)

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every step in execution order (per endpoint); compensation steps are not in it."""
        return (*self.registrations, *(s for e in self.endpoint_plans for s in e.steps))

    def transactions(self) -> list[Transaction]:
        return [
            t for e in self.endpoint_plans for t in ((e.recovery,) if e.recovery else ()) + e.transactions
        ]

    def bytes_to_send(self) -> int:
        return sum(s.bytes for s in self.steps)


@dataclass(frozen=True)
class Conversion:
    """What the convert phase means for one (version, endpoint kind), as far as planning knows."""

    spec: Any  # convert.ConvertSpec
    key: str | None  # cache key (None: PEFT shipped as is)
    files: Mapping[str, str] | None  # shipped files -> sha256; None until a conversion runs
    src: Path | None  # where they are shipped from (the cache entry or the store copy)
    size: int  # bytes (an estimate while not built)
    base_dir: Path | None = None
    base_digest: str | None = None

    @property
    def cached(self) -> bool:
        return self.files is not None and self.key is not None


# bits per weight of llama.cpp file types, for the dry run's size estimate of a merged GGUF
_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54}
_BPW.update({"Q5_1": 6, "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_1": 5, "Q4_0": 4.5})
_BPW.update({"Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35, "Q2_K_S": 3.0})


def _estimate(spec: Any, t: Target, base_dir: Path | None) -> int:
    """A rough output size for a conversion that has not run yet (shown with ≈ in the plan)."""
    import math

    from adapterctl.convert import base_shapes

    if spec.format in ("adapter", "lora") or base_dir is None:
        return t.size_bytes
    if spec.format == "fused":
        return sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    params = sum(math.prod(shape) for shape in base_shapes(base_dir).values())
    return int(params * _BPW.get(spec.quant or "F16", 16) / 8)


class ConvertPlanner:
    """Conversions for a plan: the base model checked once per model, cache entries peeked (not
    verified: the convert step re-hashes them). Planning writes nothing: the base model's digest
    cache is written by the convert step of a real run."""

    def __init__(self, cfg: Config):
        from adapterctl.convert import Cache

        self.cfg = cfg
        self.cache = Cache(cfg.store)
        self.bases: dict[str, tuple[Path, str, dict]] = {}

    def base(self, model: str, t: Target, spec: Any, ep: EndpointConfig) -> tuple[Path, str, dict]:
        from adapterctl.convert import BaseMismatch, base_digest, check_base

        m = self.cfg.models[model]
        if m.base_dir is None:
            why = "needs the base model" if spec.needs_base else "checks fidelity against the base model"
            raise BaseMismatch(
                f"model {model}: endpoint {ep.name} (kind {ep.kind}) gets a {spec.label}, which {why}, "
                f"but models.{model}.base_dir is not set in {self.cfg.path}",
                "set base_dir to the base model directory (Hugging Face layout) on this machine, "
                "or convert: peft to ship the PEFT files as they are",
            )
        if model not in self.bases:
            config = check_base(model, m.base_dir, t.source or t.store_dir)
            self.bases[model] = (m.base_dir, base_digest(m.base_dir, self.cfg.store, persist=False), config)
        return self.bases[model]

    def check_features(self, t: Target, ep: EndpointConfig, spec: Any) -> None:
        """Refuse, before anything is registered or written, an adapter this endpoint's format cannot
        express (DoRA, modules_to_save, per-module alphas in a GGUF LoRA, …): it would fail late, or go
        live wrong."""
        from adapterctl.formats import peft

        source = t.source or t.store_dir
        try:
            blockers = peft.load(source).unsupported_by(spec.format)
        except (OSError, ValueError):
            return  # registration names what is wrong with the config itself
        if blockers:
            raise UsageError(
                f"endpoint {ep.name} (kind {ep.kind}) gets {t.model} {t.version_id} as a {spec.label}, which "
                f"cannot express its {'; '.join(blockers)} ({source})",
                f"ship it as it is to that endpoint (convert: peft for endpoints.{ep.name}, when its engine "
                "loads PEFT adapters), choose another format, or train without that feature",
            )

    def plan(self, t: Target, ep: EndpointConfig) -> Conversion:
        from adapterctl.convert import Job, fidelity_spec, spec_for

        m = self.cfg.models[t.model]
        spec = spec_for(m, ep)
        if spec.passthrough:
            return Conversion(spec, None, dict(t.files), t.store_dir, t.size_bytes)
        self.check_features(t, ep, spec)
        needed = spec.needs_base or spec.fidelity or m.base_dir is not None  # an MLX adapter pads to it
        base_dir, digest, _ = self.base(t.model, t, spec, ep) if needed else (None, None, None)
        fidelity = fidelity_spec(m, self.cfg.path.parent)
        job = Job(t.model, t.version_id, spec, t.store_dir, dict(t.files), base_dir, digest, fidelity)
        key = job.key()
        doc = self.cache.peek(key)
        if doc is not None:
            return Conversion(
                spec, key, doc["files"], self.cache.entry(key), int(doc["size_bytes"]), base_dir, digest
            )
        return Conversion(spec, key, None, None, _estimate(spec, t, base_dir), base_dir, digest)


def convert_step(
    converter: ConvertPlanner, ep: EndpointConfig, t: Target, facts: EndpointFacts | None = None
) -> tuple[Convert, Conversion]:
    """The convert step of one (endpoint, version) and what planning knows of its output. With the
    endpoint's `facts`, a GGUF LoRA's base GGUF there is checked against the adapter's base model."""
    conv = converter.plan(t, ep)
    if conv.spec.format == "lora" and facts is not None:
        _check_base_gguf(ep, facts, t.model, converter.bases.get(t.model))
    step = Convert(
        ep.name,
        t.model,
        t.version_id,
        key=conv.key,
        spec=conv.spec,
        base_dir=str(conv.base_dir) if conv.base_dir else None,
        base_digest=conv.base_digest,
        store_dir=str(t.store_dir),
        files=frozen_files(t.files),
        writes=0 if conv.key is None or conv.cached else conv.size,
        text=_convert_summary(ep, conv),
    )
    return step, conv


def plan_convert(cfg: Config, deployment_id: str, targets: list[Target], endpoints: list[str]) -> Plan:
    """`adapterctl convert`: only the convert steps a deploy of `targets` to `endpoints` would run."""
    converter = ConvertPlanner(cfg)
    eplans = []
    for e in endpoints:
        ep = cfg.endpoints[e]
        converts = tuple(convert_step(converter, ep, t)[0] for t in targets if ep.serves(t.model))
        if converts:
            eplans.append(EndpointPlan(e, converts, (), _no_facts(ep)))
    return Plan(
        "convert", deployment_id, (), tuple(eplans), endpoints=tuple(endpoints), targets=tuple(targets)
    )


def _no_facts(ep: EndpointConfig) -> EndpointFacts:
    return EndpointFacts(ep.name, False, False, 0, "", "", {}, adapter_dir=ep.adapter_dir)


def _convert_summary(ep: EndpointConfig, c: Conversion) -> str:
    if c.key is None:
        return f"convert for {ep.kind}: none — the PEFT files are shipped as they are (convert: peft)"
    if c.cached:
        return (
            f"convert for {ep.kind}: {c.spec.label} — cached ({c.key[:12]}, {human_bytes(c.size)}; "
            "its hashes are checked before use, a damaged entry is rebuilt)"
        )
    how = {
        "adapter": "PEFT → mlx_lm adapter layout",
        "fused": f"merge the LoRA into {c.base_dir} (mlx fuse)",
        "merged": f"merge the LoRA into {c.base_dir}, HF→GGUF, quantize {c.spec.quant}",
        "lora": f"PEFT → GGUF LoRA against {c.base_dir}",
    }[c.spec.format]
    check = "; fidelity check against PEFT on the health suite" if c.spec.fidelity else "; no fidelity check"
    return f"convert for {ep.kind}: {c.spec.label} — will run: {how} (≈ {human_bytes(c.size)}){check}"


def _size_in(root: Path | None, files: Mapping[str, str]) -> int:
    total = 0
    for rel in files:
        src = root / rel if root is not None else None
        total += src.stat().st_size if src is not None and src.exists() else 0
    return total


def _check_base_gguf(ep: EndpointConfig, facts: EndpointFacts, model: str, base: Any) -> None:
    """A GGUF LoRA release needs the endpoint's base GGUF to be the configured file and the model the
    adapter was trained on: refuse (one line, before any transfer) when it is not."""
    from adapterctl.convert import BaseMismatch

    where = f"endpoint {ep.name}"
    if ep.base_gguf is None:
        raise BaseMismatch(
            f"{where}: format lora needs base_gguf (path and sha256 of the base GGUF there)",
            f"add base_gguf: {{path: ..., sha256: ...}} to endpoint {ep.name} in adapterctl.yaml",
        )
    got = facts.base_gguf or {}
    path = ep.base_gguf.path
    if not got.get("exists"):
        raise BaseMismatch(
            f"{where}: base GGUF {path} does not exist there",
            "copy the base model's GGUF there, or fix base_gguf.path",
        )
    if got.get("sha256") != ep.base_gguf.sha256:
        raise BaseMismatch(
            f"{where}: base GGUF {path} has sha256 {str(got.get('sha256'))[:16]}…, "
            f"the config says {ep.base_gguf.sha256[:16]}…",
            "the file there is not the configured base: restore it, or update base_gguf.sha256",
        )
    if base is None:
        return
    config = base[2]
    want = {"embedding_length": config.get("hidden_size"), "block_count": config.get("num_hidden_layers")}
    want["vocab_size"] = config.get("vocab_size")
    diff = [
        f"{k} {got.get(k)} there, {v} in {base[0]}"
        for k, v in want.items()
        if v and got.get(k) not in (None, v)
    ]
    if got.get("error") or diff:
        raise BaseMismatch(
            f"{where}: base GGUF {path} is not {model}'s base model: {got.get('error') or '; '.join(diff)}",
            f"put the GGUF of models.{model}.base_dir there (and its sha256 in base_gguf), "
            "or deploy the merged format",
        )


def health_spec_on(model_cfg: Any, ep: EndpointConfig) -> dict[str, Any]:
    """The model's health spec as it runs on `ep`: engine auto resolved by the endpoint's kind, the
    model engines pointed at the artifact its conversion format ships (see spec_for_endpoint)."""
    from dataclasses import asdict

    from adapterctl.convert import spec_for
    from adapterctl.health.engines import spec_for_endpoint

    base_gguf = ep.base_gguf.path if ep.base_gguf else None
    return spec_for_endpoint(asdict(model_cfg.health), ep.kind, spec_for(model_cfg, ep).format, base_gguf)


def _resolved_spec(model_cfg: Any, ep: EndpointConfig, local: bool) -> HealthSpec:
    """health_spec_on as a frozen HealthSpec; with --health-local, mlx runs on this machine's base."""
    from adapterctl.convert import spec_for

    spec = health_spec_on(model_cfg, ep)
    fused = spec_for(model_cfg, ep).format == "fused"  # the release is the model: its base is the release
    if local and spec.get("engine") == "mlx" and not fused and model_cfg.base_dir:
        spec["base"] = str(model_cfg.base_dir)
    defaults = {f.name: None for f in fields(HealthSpec)}
    return replace(model_cfg.health, **{**defaults, **{k: v for k, v in spec.items() if k in defaults}})


def health_plan(
    cfg: Config, model: str, ep: EndpointConfig, release: str, local_path: str | None = None
) -> HealthPlan | None:
    """The planned health check of `model` on `ep` against `release` (or a local path), or None."""
    m = cfg.models[model]
    h = m.health
    if h is None or h.suite == "none":
        return None
    where = (
        "the live `active` release"
        if release == "active"
        else (f"store/{model}/… on this machine (--health-local)" if local_path else release)
    )
    return HealthPlan(
        suite=h.suite,
        suite_dir=str(cfg.path.parent),
        spec=_resolved_spec(m, ep, local_path is not None),
        release=local_path or release,
        local=local_path is not None,
        text=_health_summary(m, where, ep),
    )


def _health_summary(model_cfg: Any, where: str, ep: EndpointConfig | None = None) -> str:
    h = model_cfg.health
    if h is None or h.suite == "none":
        return f"health-check {where}: no suite configured for {model_cfg.name} (structural checks only)"
    if h.engine == "http":
        if where != "the live `active` release":
            return (
                f"health-check {where}: skipped — the http engine sees only the live service (runs at verify)"
            )
        return f"health-check {where}: suite {h.suite} via http POST {h.url}"
    identity = (
        f"; discriminator {h.discriminator!r} must differ from the base model's answer"
        if h.discriminator and where == "the live `active` release"
        else ""
    )
    return f"health-check {where}: suite {h.suite} via {_engine_text(model_cfg, ep)}{identity}"


def _pre_check(
    cfg: Config, ep: EndpointConfig, t: Target, local_src: str | None, key: str | None
) -> HealthCheck:
    base = (ep.name, t.model, t.version_id)
    m = cfg.models[t.model]
    where = (
        f"store/{t.model}/{t.version_id} on this machine (--health-local)"
        if local_src
        else f"releases/{t.version_id}"
    )
    if m.health is None or m.health.suite == "none":
        return HealthCheck(*base, skip=_health_summary(m, where, ep))
    if m.health.engine in LIVE_ENGINES and local_src is None:
        return HealthCheck(*base, skip=_health_summary(m, where, ep))
    plan = health_plan(cfg, t.model, ep, f"releases/{t.version_id}", local_src)
    return HealthCheck(*base, health=replace(plan, text=_health_summary(m, where, ep)), key=key)


def _verify(
    cfg: Config, ep: EndpointConfig, model: str, version: str | None, suffix: str, report_only: bool
) -> Verify:
    base = (ep.name, model, version)
    if version is None:
        return Verify(
            *base,
            report_only=True,
            base=True,
            text="base model: health suite not applicable (it tests the adapter); "
            "the reload confirmation above is the check",
        )
    m = cfg.models[model]
    plan = health_plan(cfg, model, ep, "active")
    disc = m.health.discriminator if m.health else None
    return Verify(
        *base,
        health=plan,
        discriminator=disc,
        report_only=report_only,
        text=_health_summary(m, "the live `active` release", ep) + suffix,
    )


def _engine_text(model_cfg: Any, ep: EndpointConfig | None) -> str:
    """How the model's health engine runs on `ep`: the command, or the model engine and its files."""

    h = model_cfg.health
    if h.engine == "command":
        return f"command `{' '.join(h.command or ())}`"
    if ep is None:
        return h.engine
    from adapterctl.health import make_engine

    spec = health_spec_on(model_cfg, ep)
    try:
        return make_engine(spec).describe()
    except AdapterctlError as exc:
        return f"{spec.get('engine')} (cannot run: {exc.message})"


def _driver(ep: EndpointConfig, facts: EndpointFacts, allow_outage: bool) -> ReloadDriver:
    return driver_for(ep, facts.platform, facts.loaded, allow_outage)


def consent_missing(plan: Plan) -> list[str]:
    """Endpoints whose plan restarts the service without consent (a real run must refuse)."""
    return sorted({s.endpoint for s in plan.steps if isinstance(s, Reload) and s.driver.needs_consent})


def _service_check(ep: EndpointConfig, facts: EndpointFacts) -> tuple[str, str | None]:
    """(summary, warning) for the pre-swap check that the serving process is alive."""
    state = facts.pid
    if state is not None and state.alive:
        return f"check serving process: pid {state.pid} from {ep.pidfile} is running", None
    why = (state.error if state else None) or f"no pid in {ep.pidfile}"
    return f"check serving process ({ep.pidfile}) — now: {why}", why


def _activation(
    ep: EndpointConfig,
    model: str,
    active: str | None,
    previous: str | None,
    driver: ReloadDriver,
    status: str,
    compensating: bool = False,
    why: str = "",
) -> list[Step]:
    """Swap the links, re-point the compat links, reload: the core of activate, rollback and compensation."""
    base = (ep.name, model, active)
    links = [CompatLink(*base, link=p) for p, m in compat_link_paths(ep).items() if m == model]
    swap = Swap(*base, active=active, previous=previous, status=status, why=why)
    return [swap, *links, Reload(*base, driver=driver, expect=active, compensating=compensating)]


def _rollback_choice(facts: EndpointFacts, mf: ModelFacts, t: Target, old_a: str | None) -> str | None:
    """Where a failed activation returns: the last release that passed verify, if still there (DESIGN §7)."""
    good = facts.last_good(t.model)
    return good if good in mf.complete() and good != t.version_id else old_a


def _transfer_steps(ep: EndpointConfig, t: Target, conv: Conversion, mf: ModelFacts) -> list[Step]:
    base = (ep.name, t.model, t.version_id)
    files = dict(conv.files) if conv.files is not None else None
    what = f"{len(files)} files" if files is not None else f"the {conv.spec.label} files"
    release = mf.release(t.version_id)
    if release and release.complete and files is not None and set(release.files) != set(files):
        raise UsageError(
            f"endpoint {ep.name}: releases/{t.version_id} of {t.model} holds other files "
            f"({', '.join(sorted(release.files))}) than its {conv.spec.label} "
            f"({', '.join(sorted(files))}): the conversion setting changed since it was deployed",
            "deploy a new cycle, or remove that release there if it is not active",
        )
    ff, src = frozen_files(files), str(conv.src) if conv.src else None
    if release and release.complete:
        return [VerifyRelease(*base, files=ff, key=conv.key, src=src, what=what)]
    newest = mf.newest()
    known = newest.files if newest else {}
    staged = mf.staging.get(t.version_id, {})
    delta = conv.spec.format in ("merged", "fused") and newest is not None
    if files is not None:
        send = {f: s for f, s in files.items() if known.get(f) != s}
        root = conv.src if conv.src is not None and conv.src.is_dir() else t.source  # not registered yet
        size = 0
        for f in send:
            full = _size_in(root, {f: send[f]})
            if staged.get(f) == full:
                continue  # complete in staging from an interrupted run: kept after a hash check
            size += full - min(staged.get("partial:" + f, 0), full)  # a piece is continued, not resent
        reuse = (
            f"; {len(files) - len(send)} unchanged files linked from releases/{newest.version_id}"
            if newest
            else ""
        )
        head = f"send {len(send)} of {len(files)} files ({human_bytes(size)})"
    else:
        size = conv.size
        reuse = f"; files equal to releases/{newest.version_id}'s are linked" if newest else ""
        head = f"send the conversion output (≈ {human_bytes(size)})"
    if staged:
        reuse += "; resumes the transfer an interrupted run left in staging"
    if delta and newest is not None:
        reuse += f"; changed files go as rsync deltas against releases/{newest.version_id}"
    link = newest.version_id if newest else None
    return [
        Transfer(
            *base,
            files=ff,
            key=conv.key,
            src=src,
            link_from=link,
            delta=delta,
            nbytes=size,
            text=f"{head} to staging/{t.version_id}.tmp{reuse}",
        ),
        Publish(*base, files=ff, key=conv.key, src=src, link_from=link, what=what),
    ]


def _deploy_txn(
    cfg: Config,
    ep: EndpointConfig,
    facts: EndpointFacts,
    t: Target,
    conv: Conversion,
    allow_outage: bool,
    health_local: bool,
    notes: list[str],
    remember: bool,
) -> Transaction:
    mf = facts.models[t.model]
    base = (ep.name, t.model, t.version_id)
    steps: list[Step] = _transfer_steps(ep, t, conv, mf)
    bg = facts.base_gguf or {}
    if remember:
        steps.append(RememberBaseGguf(*base, path=bg["path"], stamp=bg.get("stamp"), sha256=bg.get("sha256")))
    local = (str(conv.src) if conv.src else str(t.store_dir)) if health_local else None
    steps.append(_pre_check(cfg, ep, t, local, conv.key))
    driver = _driver(ep, facts, allow_outage)
    if driver.signals_process:
        summary, warn = _service_check(ep, facts)
        if warn:
            notes.append(f"{ep.name}: warning: {warn} — activation will stop before the swap")
        steps.append(CheckService(*base, pidfile=ep.pidfile, now=summary))
    old_a, old_p = mf.usable(mf.active), mf.usable(mf.previous)  # a dangling link is not kept
    if mf.broken:
        notes.append(
            f"{ep.name}: {t.model}: `active` points at {mf.active}, which is not a complete release "
            "there (broken): this deploy replaces it"
        )
    kept = mf.keep_as_previous(t.version_id)
    restore_a = _rollback_choice(facts, mf, t, kept)
    steps += _activation(ep, t.model, t.version_id, kept, driver, "verifying")
    compensation = _activation(ep, t.model, restore_a, old_p, driver, "rolled_back", compensating=True)
    steps.append(_verify(cfg, ep, t.model, t.version_id, "", report_only=False))
    steps.append(MarkGood(*base))
    steps.append(
        Prune(
            *base,
            names=tuple(_prune_list(mf, t.version_id, kept, cfg.keep_releases)),
            keep=cfg.keep_releases,
        )
    )
    return Transaction(
        ep.name,
        t.model,
        t.version_id,
        "deploy",
        tuple(steps),
        tuple(compensation),
        before=(old_a, old_p),
        target=(t.version_id, kept),
        restore=(restore_a, old_p),
    )


def endpoint_deploy_plan(
    cfg: Config,
    ep: EndpointConfig,
    facts: EndpointFacts,
    targets: list[Target],
    notes: list[str],
    allow_outage: bool = False,
    health_local: bool = False,
    converter: ConvertPlanner | None = None,
    skip: frozenset[tuple[str, str]] = frozenset(),
) -> EndpointPlan:
    """One endpoint's part of a deploy: recovery of an interrupted command, then per target its
    conversion and transaction. Used at plan time and again under the lock when the facts changed."""
    converter = converter or ConvertPlanner(cfg)
    converts: list[Convert] = []
    txns: list[Transaction] = []
    remembered = False  # the base GGUF's hash is recorded once per endpoint
    recovery = plan_recovery(cfg, ep, facts, allow_outage)
    if recovery is not None:
        notes.append(
            f"{ep.name}: an interrupted command left an open transaction: {recovery.state.text}; "
            "then this endpoint is planned again from its state after that"
        )
    for t in targets:
        mf = facts.models[t.model]
        if (t.model, t.version_id) in skip:
            notes.append(
                f"{ep.name}: {t.model} {t.version_id} was rolled back by the recovery above: "
                "not deployed again in this run"
            )
            continue
        moving = recovery is not None and recovery.state.action not in ("abandon", "commit")
        if moving and recovery.model == t.model:  # the recovery moves its links: plan it from the result
            notes.append(
                f"{ep.name}: {t.model} is planned again from the endpoint's state once the interrupted "
                "command is finished"
            )
            continue
        if mf.active == t.version_id:
            conv = converter.plan(t, ep)
            what = (
                ""
                if conv.key is None
                else f" ({conv.spec.label} {'cached' if conv.cached else 'not in the cache'}; "
                "nothing is converted or sent)"
            )
            notes.append(f"{ep.name}: {t.model} {t.version_id} is already active — nothing to do{what}")
            continue
        step, conv = convert_step(converter, ep, t, facts)
        converts.append(step)
        bg = facts.base_gguf or {}
        remember = (
            conv.spec.format == "lora" and bg.get("exists") and not bg.get("sha256_cached") and not remembered
        )
        remembered = remembered or bool(remember)
        txns.append(_deploy_txn(cfg, ep, facts, t, conv, allow_outage, health_local, notes, bool(remember)))
    if txns:
        _outage_note(ep, _driver(ep, facts, allow_outage), notes)
        _check_space(ep, facts, txns)
    return EndpointPlan(ep.name, tuple(converts), tuple(txns), facts, recovery)


def _check_space(ep: EndpointConfig, facts: EndpointFacts, txns: list[Transaction]) -> None:
    """Refuse, before anything is written, a transfer the endpoint's disk cannot hold."""
    need = sum(s.bytes for t in txns for s in t.steps)
    margin = 64 << 10  # RELEASE.json, status and journal lines
    if os.environ.get(FAULT_ENV) == "no-space-check":  # tests: the space goes after planning
        return
    if facts.free_bytes and need + margin > facts.free_bytes:
        raise UsageError(
            f"endpoint {ep.name}: {ep.adapter_dir} has {human_bytes(facts.free_bytes)} free, "
            "this deploy writes "
            f"{human_bytes(need)} there (+{human_bytes(margin)} of records): refusing before any transfer",
            "free space there (or lower keep_releases and let older releases be pruned), then rerun",
        )


def _check_local_space(cfg: Config, regs: list[Register], eplans: list[EndpointPlan]) -> None:
    """Refuse, before anything is written, a registration or conversion this machine's disk cannot hold."""
    import shutil

    keys = {s.key: s.writes for e in eplans for s in e.converts if s.writes}
    need = sum(r.size for r in regs) + sum(keys.values())
    root = cfg.store if cfg.store.exists() else next(p for p in cfg.store.parents if p.exists())
    free = shutil.disk_usage(root).free
    if need and os.environ.get(FAULT_ENV) != "no-space-check" and need + (64 << 10) > free:
        raise UsageError(
            f"this machine: {root} has {human_bytes(free)} free, this deploy writes {human_bytes(need)} "
            "there "
            f"({len(regs)} registrations, {len(keys)} conversions): refusing before anything is written",
            "free space in the store (adapterctl convert --prune, adapterctl gc), then rerun",
        )


def _outage_note(ep: EndpointConfig, driver: ReloadDriver, notes: list[str]) -> None:
    if driver.needs_consent:
        notes.append(
            f"{ep.name}: reload_method restart stops the service (expected outage {driver.outage}): "
            "a real run needs --allow-outage, or allow_outage: true in this endpoint's config"
        )


def plan_recovery(
    cfg: Config, ep: EndpointConfig, facts: EndpointFacts, allow_outage: bool
) -> Transaction | None:
    """What finishes (or undoes) the transaction an interrupted command left open on this endpoint."""
    if facts.journal is None:
        return None
    b = facts.journal.begin
    model, version = b.get("model"), b.get("version")
    if model not in cfg.models or model not in facts.models:
        return None
    mf = facts.models[model]
    state = state_of(facts.journal, mf)
    driver = _driver(ep, facts, allow_outage)
    before, target, restore = (
        tuple((b.get(k) or {}).get(s) for s in ("active", "previous"))
        for k in ("before", "target", "restore")
    )
    base = (ep.name, model, version)
    steps: list[Step] = []
    compensation: list[Step] = []
    if state.action == "roll-forward":
        steps = _activation(ep, model, version, target[1], driver, "verifying")[1:]  # the swap happened
        steps += [_verify(cfg, ep, model, version, "", report_only=False), MarkGood(*base)]
        compensation = _activation(
            ep, model, restore[0], restore[1], driver, "rolled_back", compensating=True
        )
    elif state.action == "compensate":
        steps = _activation(ep, model, restore[0], restore[1], driver, "rolled_back", compensating=True)
    elif state.action == "commit":
        steps = [MarkGood(*base)]
    elif state.action == "undo-swap":
        steps = [
            Swap(
                *base,
                active=mf.usable(mf.active) or before[0],
                previous=before[1],
                status="unverified",
                why=" — put back as they were before the interrupted deploy",
            )
        ]
    elif state.action == "complete":
        steps = _activation(ep, model, target[0], target[1], driver, "unverified")
        steps += [_verify(cfg, ep, model, target[0], " (report only)", report_only=True)]
        steps += [MarkGood(*base)] if target[0] else []
    return Transaction(
        ep.name,
        model,
        version,
        "recover",
        tuple(steps),
        tuple(compensation),
        before=before,
        target=target,
        restore=restore,
        txn=facts.journal.txn,
        state=state,
    )


def plan_deploy(
    cfg: Config,
    deployment_id: str,
    targets: list[Target],
    endpoint_facts: Mapping[str, EndpointFacts | AdapterctlError],
    cycle: int | None = None,
    canary: str | None = None,
    allow_outage: bool = False,
    health_local: bool = False,
) -> Plan:
    """The whole deploy as data: version steps, then per endpoint its locked transactions."""
    converter = ConvertPlanner(cfg)
    regs: list[Register] = []
    notes: list[str] = []
    blocked: list[tuple[str, str | None, str]] = []
    for t in targets:
        if t.source is not None:
            regs.append(
                Register(
                    None,
                    t.model,
                    t.version_id,
                    source=str(t.source),
                    cycle=cycle,
                    nfiles=len(t.files),
                    size=t.size_bytes,
                )
            )
        else:
            notes.append(f"{t.model}: {t.version_id} is registered already ({human_bytes(t.size_bytes)})")
    order = sorted(endpoint_facts, key=lambda n: n != canary)  # the canary's steps come first
    if canary is not None:
        notes.append(f"canary {canary}: runs first, through verify; the other endpoints only if it succeeds")
    eplans = []
    for name in order:
        facts = endpoint_facts[name]
        ep = cfg.endpoints[name]
        if isinstance(facts, AdapterctlError):
            blocked.append((name, None, str(facts)))
            continue
        if facts.problem:
            blocked.append((name, None, f"{facts.problem} — move it aside or choose another adapter_dir"))
            continue
        mine = [t for t in targets if ep.serves(t.model)]
        eplans.append(
            endpoint_deploy_plan(cfg, ep, facts, mine, notes, allow_outage, health_local, converter)
        )
    _check_local_space(cfg, regs, eplans)
    return Plan(
        "deploy",
        deployment_id,
        tuple(regs),
        tuple(eplans),
        tuple(notes),
        tuple(blocked),
        tuple(order),
        tuple(targets),
        cycle,
        canary,
    )


def endpoint_rollback_plan(
    cfg: Config,
    ep: EndpointConfig,
    facts: EndpointFacts,
    models: list[str],
    to: str,
    allow_outage: bool,
    notes: list[str],
) -> EndpointPlan:
    """Per model: swap to the chosen release (`to` base: no adapter), reload, verify (report only)."""
    txns = []
    recovery = plan_recovery(cfg, ep, facts, allow_outage)
    if recovery is not None:
        notes.append(f"{ep.name}: an interrupted command left an open transaction: {recovery.state.text}")
    driver = _driver(ep, facts, allow_outage)
    for model in models:
        if recovery is not None and recovery.state.action == "complete" and recovery.model == model:
            notes.append(
                f"{ep.name}: {model}: this command completes the interrupted rollback "
                f"(to {recovery.target[0] or 'the base model'}) instead of rolling back again"
            )
            continue
        mf = facts.models[model]
        target = rollback_target(ep, model, mf, facts, to)
        base = (ep.name, model, target)
        steps: list[Step] = []
        if driver.signals_process:
            steps.append(CheckService(*base, pidfile=ep.pidfile, now=_service_check(ep, facts)[0]))
        steps += _activation(ep, model, target, mf.keep_as_previous(target), driver, "unverified")
        steps.append(
            _verify(cfg, ep, model, target, " (report only: a manual rollback is not undone by itself)", True)
        )
        if target is not None:
            steps.append(MarkGood(*base))
        txns.append(
            Transaction(
                ep.name,
                model,
                target,
                "rollback",
                tuple(steps),
                before=(mf.active, mf.previous),
                target=(target, mf.active),
            )
        )
    _outage_note(ep, driver, notes)
    return EndpointPlan(ep.name, (), tuple(txns), facts, recovery)


def plan_rollback(
    cfg: Config,
    deployment_id: str,
    pairs: list[tuple[str, str]],
    endpoint_facts: Mapping[str, EndpointFacts],
    to: str,
    allow_outage: bool = False,
) -> Plan:
    """Per (endpoint, model): lock, swap to the chosen release, reload, verify (report only)."""
    notes: list[str] = []
    by_ep: dict[str, list[str]] = {}
    for ep_name, model in pairs:
        by_ep.setdefault(ep_name, []).append(model)
    eplans = [
        endpoint_rollback_plan(cfg, cfg.endpoints[e], endpoint_facts[e], models, to, allow_outage, notes)
        for e, models in by_ep.items()
    ]
    return Plan(
        "rollback", deployment_id, (), tuple(eplans), tuple(notes), endpoints=tuple(by_ep), rollback_to=to
    )


def rollback_target(
    ep: EndpointConfig, model: str, mf: ModelFacts, facts: EndpointFacts, to: str
) -> str | None:
    """Which release `rollback --to` means on this endpoint (None: `base`, serve no adapter).

    Raises UsageError naming what exists.
    """
    have = mf.complete()
    exists = f"releases there: {', '.join(have) or 'none'}; active: {mf.active or 'none'}"
    if to == "base":
        if mf.active is None:
            raise UsageError(f"{ep.name}: {model} already serves the base model (no `active` link; {exists})")
        return None
    if to == "previous":
        target = mf.previous
        if not target or target == "?":
            raise UsageError(
                f"{ep.name}: {model} has no previous release to roll back to ({exists})",
                "roll back with --to VERSION to one of those releases",
            )
    elif to == "last-good":
        target = facts.last_good(model)
        if not target:
            raise UsageError(f"{ep.name}: {model} has no verified last-good release recorded ({exists})")
    else:
        target = to
    if target not in have:
        raise UsageError(f"{ep.name}: {model} has no release {target} ({exists})")
    if target == mf.active:
        raise UsageError(f"{ep.name}: {model} {target} is already active ({exists})")
    return target


def _prune_list(mf: ModelFacts, new: str, new_previous: str | None, keep: int) -> list[str]:
    """Releases to remove after `new` is published, newest first kept, links protected."""
    ordered = sorted(mf.releases, key=lambda r: r.mtime, reverse=True)
    names = [new] + [r.version_id for r in ordered if r.version_id != new]
    protected = {new, new_previous}
    return [n for n in names[keep:] if n not in protected]
