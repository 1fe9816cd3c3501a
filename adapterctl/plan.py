"""Facts in, frozen steps out (STYLE: pyinfra). `--dry-run` prints a Plan; a real run executes it.

Nothing in this module writes anything: it reads the manifest, the adapter sources and the
endpoints' facts, and returns data. `execute.py` runs exactly the steps returned here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.config import Config, EndpointConfig
from adapterctl.errors import AdapterctlError, UsageError
from adapterctl.transports.base import Transport


@dataclass(frozen=True)
class Step:
    """One action of a plan. `args` holds everything execution needs, as frozen pairs."""

    phase: str  # version | convert | transfer | health-check | activate | verify | prune | lock | rollback
    action: str  # key of the executor function
    summary: str  # what a person reads in the plan
    endpoint: str | None = None
    model: str | None = None
    version: str | None = None
    bytes: int = 0
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


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
class Plan:
    kind: str  # deploy | rollback
    deployment_id: str
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()  # per endpoint/model lines that need no step ("already active")
    blocked: tuple[tuple[str, str | None, str], ...] = ()  # (endpoint, model, why) that cannot run
    endpoints: tuple[str, ...] = ()
    targets: tuple[Target, ...] = field(default=())
    cycle: int | None = None
    canary: str | None = None  # this endpoint runs first, through verify; the rest only if it passed

    def bytes_to_send(self) -> int:
        return sum(s.bytes for s in self.steps if s.phase == "transfer")


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

    def plan(self, t: Target, ep: EndpointConfig) -> Conversion:
        from adapterctl.convert import Job, fidelity_spec, spec_for

        m = self.cfg.models[t.model]
        spec = spec_for(m, ep)
        if spec.passthrough:
            return Conversion(spec, None, dict(t.files), t.store_dir, t.size_bytes)
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
    converter: ConvertPlanner, ep: EndpointConfig, t: Target, facts: Mapping[str, Any] | None = None
) -> tuple[Step, Conversion]:
    """The convert step of one (endpoint, version) and what planning knows of its output. With the
    endpoint's `facts`, a GGUF LoRA's base GGUF there is checked against the adapter's base model."""
    conv = converter.plan(t, ep)
    if conv.spec.format == "lora" and facts is not None:
        _check_base_gguf(ep, facts, t.model, converter.bases.get(t.model))
    step = Step(
        "convert",
        "convert",
        _convert_summary(ep, conv),
        endpoint=ep.name,
        model=t.model,
        version=t.version_id,
        args=(
            ("key", conv.key),
            ("spec", conv.spec),
            ("base_dir", str(conv.base_dir) if conv.base_dir else None),
            ("base_digest", conv.base_digest),
        ),
    )
    return step, conv


def plan_convert(cfg: Config, deployment_id: str, targets: list[Target], endpoints: list[str]) -> Plan:
    """`adapterctl convert`: only the convert steps a deploy of `targets` to `endpoints` would run."""
    converter = ConvertPlanner(cfg)
    steps = [
        convert_step(converter, cfg.endpoints[e], t)[0]
        for t in targets
        for e in endpoints
        if cfg.endpoints[e].serves(t.model)
    ]
    return Plan("convert", deployment_id, tuple(steps), endpoints=tuple(endpoints), targets=tuple(targets))


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


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def compat_link_paths(ep: EndpointConfig) -> dict[str, str]:
    """Absolute link path on the endpoint -> model, for the endpoint's `compat_links`."""
    parent = os.path.dirname(ep.adapter_dir.rstrip("/"))
    return {os.path.join(parent, rel): model for rel, model in ep.compat_links.items()}


def loaded_file(ep: EndpointConfig, model: str | None = None) -> str | None:
    """Where the serving helper reports what it loaded, beside the pidfile: loaded.json (the latest
    report) or, for one model of a process that serves several, loaded.<model>.json."""
    if not ep.pidfile:
        return None
    return os.path.join(os.path.dirname(ep.pidfile), f"loaded.{model}.json" if model else "loaded.json")


def gather_facts(ep: EndpointConfig, transport: Transport, models: list[str]) -> dict[str, Any]:
    """Read an endpoint's state (releases, links, lock, status, serving pid). Writes nothing."""
    return transport.call(
        "facts",
        adapter_dir=ep.adapter_dir,
        models=models,
        pidfile=ep.pidfile if ep.reload_method in ("sigusr1", "restart") else None,
        compat_links=compat_link_paths(ep),
        loaded_file=loaded_file(ep),
        base_gguf=ep.base_gguf.path if ep.base_gguf else None,
    )


def _newest_release(mfacts: Mapping[str, Any]) -> Mapping[str, Any] | None:
    complete = [r for r in mfacts["releases"] if r["complete"]]
    return max(complete, key=lambda r: r["mtime"]) if complete else None


def _restart_manager(facts: Mapping[str, Any]) -> str:
    """launchctl on a macOS endpoint (its python reports sys.platform darwin), else systemctl."""
    return "launchctl" if facts.get("platform") == "darwin" else "systemctl"


def outage_consent(ep: EndpointConfig, allow_outage: bool) -> bool:
    """Whether this endpoint may be restarted: --allow-outage, or allow_outage: true in its config."""
    return ep.reload_method != "restart" or allow_outage or ep.allow_outage


def _reload_step(
    ep: EndpointConfig, facts: Mapping[str, Any], allow_outage: bool, phase: str, **base: Any
) -> Step:
    """The reload step of one (endpoint, model, version); `base` holds endpoint, model and version."""
    args: tuple[tuple[str, Any], ...] = ()
    if ep.reload_method == "restart":
        args = (("manager", _restart_manager(facts)), ("needs_consent", not outage_consent(ep, allow_outage)))
    summary = _reload_summary(ep, facts, base["version"], allow_outage)
    return Step(phase, "reload", summary, **base, args=args)


def consent_missing(plan: Plan) -> list[str]:
    """Endpoints whose plan restarts the service without consent (a real run must refuse)."""
    return sorted({s.endpoint for s in plan.steps if s.action == "reload" and s.arg("needs_consent")})


def _reload_summary(
    ep: EndpointConfig, facts: Mapping[str, Any], version: str | None, allow_outage: bool = False
) -> str:
    what = version or "no adapter"
    if ep.reload_method == "none":
        return "reload: none configured (the service re-reads `active` on its own); outage 0 s"
    if ep.reload_method == "sigusr1":
        pid = (facts.get("pid") or {}).get("pid")
        confirm = (
            f"wait ≤ {ep.reload_timeout_s:g} s for loaded.json to report {what}"
            if facts.get("loaded") is not None
            else "the service writes no loaded.json: reload cannot be confirmed"
        )
        return f"reload: SIGUSR1 to pid {pid} (from {ep.pidfile}); {confirm}; outage 0 s"
    if _restart_manager(facts) == "launchctl":
        command = f"launchctl kickstart -k {ep.unit}"
    else:
        command = f"systemctl restart {ep.unit}"
    confirm = (
        f"wait ≤ {ep.reload_timeout_s:g} s for loaded.json (new pid) to report {what}"
        if facts.get("loaded") is not None
        else "no loaded.json beside the pidfile: restart not confirmed"
    )
    consent = (
        ""
        if outage_consent(ep, allow_outage)
        else "; needs --allow-outage (or allow_outage: true for this endpoint)"
    )
    return f"reload: {command}; expected outage 10–20 s; {confirm}{consent}"


def _service_check(ep: EndpointConfig, facts: Mapping[str, Any]) -> tuple[str, str | None]:
    """(summary, warning) for the pre-swap check that the serving process is alive."""
    state = facts.get("pid") or {}
    if state.get("alive"):
        return f"check serving process: pid {state['pid']} from {ep.pidfile} is running", None
    why = state.get("error") or f"no pid in {ep.pidfile}"
    return f"check serving process ({ep.pidfile}) — now: {why}", why


def _endpoint_steps(
    cfg: Config,
    ep: EndpointConfig,
    facts: Mapping[str, Any],
    targets: list[Target],
    notes: list[str],
    allow_outage: bool = False,
    health_local: bool = False,
    converter: ConvertPlanner | None = None,
) -> list[Step]:
    converter = converter or ConvertPlanner(cfg)
    steps: list[Step] = []
    remembered = False  # the base GGUF's hash is recorded once per endpoint
    links = compat_link_paths(ep)
    for t in targets:
        mf = facts["models"][t.model]
        if mf["active"] == t.version_id:
            conv = converter.plan(t, ep)
            what = (
                ""
                if conv.key is None
                else f" ({conv.spec.label} {'cached' if conv.cached else 'not in the cache'}; "
                "nothing is converted or sent)"
            )
            notes.append(f"{ep.name}: {t.model} {t.version_id} is already active — nothing to do{what}")
            continue
        release = next((r for r in mf["releases"] if r["version_id"] == t.version_id), None)
        base = dict(endpoint=ep.name, model=t.model, version=t.version_id)
        step, conv = convert_step(converter, ep, t, facts)
        steps.append(step)
        files = dict(conv.files) if conv.files is not None else None
        what = f"{len(files)} files" if files is not None else f"the {conv.spec.label} files"
        if release and release["complete"] and files is not None and set(release["files"]) != set(files):
            raise UsageError(
                f"endpoint {ep.name}: releases/{t.version_id} of {t.model} holds other files "
                f"({', '.join(sorted(release['files']))}) than its {conv.spec.label} "
                f"({', '.join(sorted(files))}): the conversion setting changed since it was deployed",
                "deploy a new cycle, or remove that release there if it is not active",
            )
        if release and release["complete"]:
            steps.append(
                Step(
                    "transfer",
                    "verify_release",
                    f"releases/{t.version_id} already on endpoint: re-verify sha256 of {what} there "
                    "(0 bytes to send)",
                    **base,
                    args=(("files", files), ("key", conv.key)),
                )
            )
        else:
            newest = _newest_release(mf)
            known = newest["files"] if newest else {}
            delta = conv.spec.format in ("merged", "fused") and newest is not None
            if files is not None:
                send = {f: s for f, s in files.items() if known.get(f) != s}
                size = _size_in(conv.src, send)
                reuse = (
                    f"; {len(files) - len(send)} unchanged files linked from releases/{newest['version_id']}"
                    if newest
                    else ""
                )
                head = f"send {len(send)} of {len(files)} files ({human_bytes(size)})"
            else:
                size = conv.size
                reuse = f"; files equal to releases/{newest['version_id']}'s are linked" if newest else ""
                head = f"send the conversion output (≈ {human_bytes(size)})"
            if delta and newest is not None:
                reuse += f"; changed files go as rsync deltas against releases/{newest['version_id']}"
            steps.append(
                Step(
                    "transfer",
                    "transfer",
                    f"{head} to staging/{t.version_id}.tmp{reuse}",
                    bytes=size,
                    **base,
                    args=(
                        ("src", str(conv.src) if conv.src else None),
                        ("files", files),
                        ("key", conv.key),
                        ("link_dest", newest["version_id"] if newest else None),
                        ("delta", delta),
                    ),
                )
            )
            steps.append(
                Step(
                    "transfer",
                    "publish",
                    f"sha256 of {what} computed on the endpoint, compared with the manifest; "
                    f"staging/{t.version_id}.tmp → releases/{t.version_id}",
                    **base,
                    args=(("files", files), ("key", conv.key)),
                )
            )
        bg = facts.get("base_gguf") or {}
        if conv.spec.format == "lora" and bg.get("exists") and not bg.get("sha256_cached") and not remembered:
            remembered = True
            steps.append(
                Step(
                    "transfer",
                    "remember_base_gguf",
                    f"record {bg['path']}'s sha256 there by size, mtime and inode: the next deploy "
                    "reads it instead of hashing the base GGUF again",
                    **base,
                    args=(("path", bg["path"]), ("stamp", bg.get("stamp")), ("sha256", bg.get("sha256"))),
                )
            )
        model_cfg = cfg.models[t.model]
        steps.append(
            Step(
                "health-check",
                "health",
                _health_summary(
                    model_cfg, f"store/{t.model}/{t.version_id} on this machine (--health-local)", ep
                )
                if health_local
                else _health_summary(model_cfg, f"releases/{t.version_id}", ep),
                **base,
                args=(("local", str(conv.src) if conv.src else "@artifact"), ("key", conv.key))
                if health_local
                else (),
            )
        )
        if ep.reload_method == "sigusr1":
            summary, warn = _service_check(ep, facts)
            if warn:
                notes.append(f"{ep.name}: warning: {warn} — activation will stop before the swap")
            steps.append(Step("activate", "check_service", summary, **base))
        old_a, old_p = mf["active"], mf["previous"]
        restore_a = _rollback_choice(facts, mf, t, old_a)
        steps.append(
            Step(
                "activate",
                "swap",
                f"previous → {old_a or '(none)'}, active → {t.version_id} (rename(2) of each link)",
                **base,
                args=(
                    ("active", t.version_id),
                    ("previous", old_a),
                    ("restore_active", restore_a),
                    ("restore_previous", old_p),
                ),
            )
        )
        for path, model in links.items():
            if model == t.model:
                steps.append(
                    Step(
                        "activate",
                        "compat_link",
                        f"link {path} → {t.model}/active",
                        **base,
                        args=(("link", path),),
                    )
                )
        steps.append(_reload_step(ep, facts, allow_outage, "activate", **base))
        steps.append(
            Step(
                "verify",
                "verify",
                _health_summary(model_cfg, "the live `active` release", ep)
                + f"; on failure roll back by itself: active → {restore_a or '(none)'}, "
                f"previous → {old_p or '(none)'}, reload again",
                **base,
            )
        )
        doomed = _prune_list(mf, t.version_id, old_a, cfg.keep_releases)
        if doomed:
            steps.append(
                Step(
                    "prune",
                    "prune",
                    f"remove old releases {', '.join(doomed)} "
                    f"(keep {cfg.keep_releases}; never what active/previous point to)",
                    **base,
                    args=(("names", tuple(doomed)),),
                )
            )
    if not steps:
        return []
    _outage_note(ep, allow_outage, notes)
    holder = Step(
        "lock", "lock", f"take the endpoint lock {ep.adapter_dir}/.adapterctl.lock", endpoint=ep.name
    )
    # conversions run on this machine and may take minutes: before the endpoint is locked
    converts = [s for s in steps if s.phase == "convert"]
    rest = [s for s in steps if s.phase != "convert"]
    return [*converts, holder, *rest, Step("lock", "unlock", "release the endpoint lock", endpoint=ep.name)]


def _outage_note(ep: EndpointConfig, allow_outage: bool, notes: list[str]) -> None:
    if not outage_consent(ep, allow_outage):
        notes.append(
            f"{ep.name}: reload_method restart stops the service (expected outage 10–20 s): "
            "a real run needs --allow-outage, or allow_outage: true in this endpoint's config"
        )


def _rollback_choice(
    facts: Mapping[str, Any], mf: Mapping[str, Any], t: Target, old_a: str | None
) -> str | None:
    """Where a failed activation returns: the last release that passed verify, if still there (DESIGN §7)."""
    good = (((facts.get("status") or {}).get("models") or {}).get(t.model) or {}).get("last_good_version")
    complete = {r["version_id"] for r in mf["releases"] if r["complete"]}
    return good if good in complete and good != t.version_id else old_a


def _size_in(root: Path | None, files: Mapping[str, str]) -> int:
    total = 0
    for rel in files:
        src = root / rel if root is not None else None
        total += src.stat().st_size if src is not None and src.exists() else 0
    return total


def _check_base_gguf(ep: EndpointConfig, facts: Mapping[str, Any], model: str, base: Any) -> None:
    """A GGUF LoRA release needs the endpoint's base GGUF to be the configured file and the model the
    adapter was trained on: refuse (one line, before any transfer) when it is not."""
    from adapterctl.convert import BaseMismatch

    where = f"endpoint {ep.name}"
    if ep.base_gguf is None:
        raise BaseMismatch(
            f"{where}: format lora needs base_gguf (path and sha256 of the base GGUF there)",
            f"add base_gguf: {{path: ..., sha256: ...}} to endpoint {ep.name} in adapterctl.yaml",
        )
    got = facts.get("base_gguf") or {}
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


def _engine_text(model_cfg: Any, ep: EndpointConfig | None) -> str:
    """How the model's health engine runs on `ep`: the command, or the model engine and its files."""
    from dataclasses import asdict

    h = model_cfg.health
    if h.engine == "command":
        return f"command `{' '.join(h.command or ())}`"
    if ep is None:
        return h.engine
    from adapterctl.convert import spec_for
    from adapterctl.health import make_engine
    from adapterctl.health.engines import spec_for_endpoint

    base_gguf = ep.base_gguf.path if ep.base_gguf else None
    spec = spec_for_endpoint(asdict(h), ep.kind, spec_for(model_cfg, ep).format, base_gguf)
    try:
        return make_engine(spec).describe()
    except AdapterctlError as exc:
        return f"{spec.get('engine')} (cannot run: {exc.message})"


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


def _prune_list(mf: Mapping[str, Any], new: str, new_previous: str | None, keep: int) -> list[str]:
    """Releases to remove after `new` is published, newest first kept, links protected."""
    ordered = sorted(mf["releases"], key=lambda r: r["mtime"], reverse=True)
    names = [new] + [r["version_id"] for r in ordered if r["version_id"] != new]
    protected = {new, new_previous}
    return [n for n in names[keep:] if n not in protected]


def plan_deploy(
    cfg: Config,
    deployment_id: str,
    targets: list[Target],
    endpoint_facts: Mapping[str, Mapping[str, Any] | AdapterctlError],
    cycle: int | None = None,
    canary: str | None = None,
    allow_outage: bool = False,
    health_local: bool = False,
) -> Plan:
    """The whole deploy as data: version steps, then per endpoint its locked pipeline."""
    converter = ConvertPlanner(cfg)
    steps: list[Step] = []
    notes: list[str] = []
    blocked: list[tuple[str, str | None, str]] = []
    for t in targets:
        if t.source is not None:
            steps.append(
                Step(
                    "version",
                    "register",
                    f"register {t.source} as {t.version_id}: copy {len(t.files)} files "
                    f"({human_bytes(t.size_bytes)}) into the store, record in manifest.json",
                    model=t.model,
                    version=t.version_id,
                    args=(("source", str(t.source)),),
                )
            )
        else:
            notes.append(f"{t.model}: {t.version_id} is registered already ({human_bytes(t.size_bytes)})")
    order = sorted(endpoint_facts, key=lambda n: n != canary)  # the canary's steps come first
    if canary is not None:
        notes.append(f"canary {canary}: runs first, through verify; the other endpoints only if it succeeds")
    for name in order:
        facts = endpoint_facts[name]
        ep = cfg.endpoints[name]
        mine = [t for t in targets if ep.serves(t.model)]
        if isinstance(facts, AdapterctlError):
            blocked.append((name, None, str(facts)))
            continue
        if facts.get("problem"):
            blocked.append((name, None, f"{facts['problem']} — move it aside or choose another adapter_dir"))
            continue
        steps.extend(_endpoint_steps(cfg, ep, facts, mine, notes, allow_outage, health_local, converter))
    return Plan(
        "deploy",
        deployment_id,
        tuple(steps),
        tuple(notes),
        tuple(blocked),
        tuple(order),
        tuple(targets),
        cycle,
        canary,
    )


def rollback_target(
    ep: EndpointConfig, model: str, mfacts: Mapping[str, Any], status: Mapping[str, Any] | None, to: str
) -> str | None:
    """Which release `rollback --to` means on this endpoint (None: `base`, serve no adapter).

    Raises UsageError naming what exists.
    """
    have = [r["version_id"] for r in mfacts["releases"] if r["complete"]]
    exists = f"releases there: {', '.join(have) or 'none'}; active: {mfacts['active'] or 'none'}"
    if to == "base":
        if mfacts["active"] is None:
            raise UsageError(f"{ep.name}: {model} already serves the base model (no `active` link; {exists})")
        return None
    if to == "previous":
        target = mfacts["previous"]
        if not target or target == "?":
            raise UsageError(
                f"{ep.name}: {model} has no previous release to roll back to ({exists})",
                "roll back with --to VERSION to one of those releases",
            )
    elif to == "last-good":
        target = ((status or {}).get("models", {}).get(model) or {}).get("last_good_version")
        if not target:
            raise UsageError(f"{ep.name}: {model} has no verified last-good release recorded ({exists})")
    else:
        target = to
    if target not in have:
        raise UsageError(f"{ep.name}: {model} has no release {target} ({exists})")
    if target == mfacts["active"]:
        raise UsageError(f"{ep.name}: {model} {target} is already active ({exists})")
    return target


def plan_rollback(
    cfg: Config,
    deployment_id: str,
    pairs: list[tuple[str, str]],
    endpoint_facts: Mapping[str, Mapping[str, Any]],
    to: str,
    allow_outage: bool = False,
) -> Plan:
    """Per (endpoint, model): lock, swap to the chosen release, reload, verify (report only).

    `to` base: `active` is removed (previous ← old active), the service reloads with no adapter,
    and the health suite is skipped (it tests the adapter); the reload confirmation still runs.
    """
    notes: list[str] = []
    steps: list[Step] = []
    by_ep: dict[str, list[str]] = {}
    for ep_name, model in pairs:
        by_ep.setdefault(ep_name, []).append(model)
    for ep_name, models in by_ep.items():
        ep, facts = cfg.endpoints[ep_name], endpoint_facts[ep_name]
        ep_steps: list[Step] = []
        for model in models:
            mf = facts["models"][model]
            target = rollback_target(ep, model, mf, facts.get("status"), to)
            base = dict(endpoint=ep_name, model=model, version=target)
            if ep.reload_method == "sigusr1":
                ep_steps.append(Step("activate", "check_service", _service_check(ep, facts)[0], **base))
            shown = target or "(base model, no adapter)"
            ep_steps.append(
                Step(
                    "rollback",
                    "swap",
                    f"active → {shown}, previous → {mf['active']}",
                    **base,
                    args=(("active", target), ("previous", mf["active"])),
                )
            )
            for path, m in compat_link_paths(ep).items():
                if m == model:
                    ep_steps.append(
                        Step(
                            "rollback",
                            "compat_link",
                            f"link {path} → {model}/active",
                            **base,
                            args=(("link", path),),
                        )
                    )
            ep_steps.append(_reload_step(ep, facts, allow_outage, "rollback", **base))
            if target is None:
                verify = Step(
                    "verify",
                    "verify",
                    "base model: health suite not applicable (it tests the adapter); "
                    "the reload confirmation above is the check",
                    **base,
                    args=(("report_only", True), ("base", True)),
                )
            else:
                verify = Step(
                    "verify",
                    "verify",
                    _health_summary(cfg.models[model], "the live `active` release", ep)
                    + " (report only: a manual rollback is not undone by itself)",
                    **base,
                    args=(("report_only", True),),
                )
            ep_steps.append(verify)
        _outage_note(ep, allow_outage, notes)
        steps += [
            Step(
                "lock", "lock", f"take the endpoint lock {ep.adapter_dir}/.adapterctl.lock", endpoint=ep_name
            ),
            *ep_steps,
            Step("lock", "unlock", "release the endpoint lock", endpoint=ep_name),
        ]
    return Plan("rollback", deployment_id, tuple(steps), tuple(notes), endpoints=tuple(by_ep))
