"""Step kinds: frozen values with typed fields, a one-line `describe()` and `run(ctx)` (DESIGN §9).

The planner builds them from facts; `--dry-run` prints their descriptions; the executor runs exactly
them, journaling the ones with side effects on the endpoint (`journaled`). Everything a step needs
was decided at plan time and is one of its fields: the health spec, the reload driver, the bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from adapterctl.config import Config, EndpointConfig, HealthSpec
from adapterctl.errors import AdapterctlError, HealthCheckFailed, PhaseError, TransportError
from adapterctl.identity import Identity, iso
from adapterctl.outcome import Outcome
from adapterctl.reload import ReloadDriver, Trigger
from adapterctl.transports.base import Transport
from adapterctl.units import human_bytes

Files = tuple[tuple[str, str], ...]  # (relative path, sha256), sorted: a frozen file map
LIVE_ENGINES = ("http",)  # engines that query the running service: they can only verify after activation


def frozen_files(files: Mapping[str, str] | None) -> Files | None:
    return None if files is None else tuple(sorted(files.items()))


# -- what steps run with ---------------------------------------------------------------------------
@dataclass
class RunState:
    """Shared by every step of one command: config, clock, identity and the conversions made so far."""

    cfg: Config
    identity: Identity
    clock: Callable[[], datetime]
    deployment_id: str
    progress: Callable[[str], None] = lambda line: None
    board: Any = None  # optional live display: .phase(endpoint, text), .advance(endpoint, nbytes)
    cycle: int | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # conversion key -> convert.Artifact
    convert_failed: dict[str, AdapterctlError] = field(default_factory=dict)  # key -> why: not retried
    convert_locks: dict[str, threading.Lock] = field(default_factory=dict)  # one conversion per key
    guard: threading.Lock = field(default_factory=threading.Lock)
    manifest: Any = None

    def convert_lock(self, key: str) -> threading.Lock:
        with self.guard:
            return self.convert_locks.setdefault(key, threading.Lock())

    def entry(self, model: str, version: str | None) -> dict[str, Any] | None:
        """The manifest's entry of a version, read once per run (again if it was registered since)."""
        from adapterctl.manifest import Manifest

        if version is None:
            return None
        entry = self.manifest.version(model, version) if self.manifest else None
        if entry is None:  # registered during this run: read again
            self.manifest = Manifest.load(self.cfg.store)
            entry = self.manifest.version(model, version)
        return entry

    def weights_sha(self, model: str, version: str | None) -> str | None:
        """The manifest's sha256 of a version's weights (identity check of a reload), None if unknown."""
        entry = self.entry(model, version)
        return entry["sha256"] if entry else None

    def artifact_files(self, step: Any) -> tuple[dict[str, str], str | None]:
        """(files, source dir) a step ships: the plan's, or those of the conversion made in this run."""
        if step.files is not None:
            return dict(step.files), step.src
        artifact = self.artifacts.get(step.key)
        if artifact is None:
            raise PhaseError(f"{step.model} {step.version}: no conversion output for {step.key}")
        return dict(artifact.files), str(artifact.dir)


@dataclass
class StepContext:
    """One (endpoint, model) pipeline at run time: where it runs and what it has done so far."""

    run: RunState
    endpoint: str
    model: str
    transport: Transport | None
    outcome: Outcome
    trigger: Trigger | None = None  # the last reload trigger, for its confirmation

    @property
    def ep(self) -> EndpointConfig:
        return self.run.cfg.endpoints[self.endpoint]

    def say(self, text: str) -> None:
        self.run.progress(f"[{self.endpoint}] {self.model}: {text}")

    def status_update(self, fields: dict[str, Any]) -> None:
        """Merge fields into status.json's entry for the model; a failure is a warning, never fatal."""
        try:
            self.transport.call(
                "update_status",
                adapter_dir=self.ep.adapter_dir,
                endpoint=self.endpoint,
                model=self.model,
                fields=fields,
                now=iso(self.run.clock()),
            )
        except AdapterctlError as exc:
            self.say(f"warning: status.json not updated: {exc}")

    def weights_sha(self, version: str | None) -> str | None:
        return self.run.weights_sha(self.model, version)


# -- the step kinds ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """Common fields; subclasses add their own and implement describe() and run()."""

    endpoint: str | None
    model: str | None
    version: str | None

    phase: ClassVar[str] = "?"
    action: ClassVar[str] = "?"
    journaled: ClassVar[bool] = False  # a side effect on the endpoint: intent/done in its journal

    @property
    def bytes(self) -> int:
        return 0

    @property
    def summary(self) -> str:
        return self.describe()

    def describe(self) -> str:
        raise NotImplementedError

    def run(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        common = ("endpoint", "model", "version")
        args = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in common}
        return {
            "phase": self.phase,
            "action": self.action,
            "summary": self.describe(),
            "endpoint": self.endpoint,
            "model": self.model,
            "version": self.version,
            "bytes": self.bytes,
            "args": args,
        }


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if isinstance(value, ReloadDriver):
        return {"method": value.method, **asdict(value)}
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return dict(value)
    return value


class Texted:
    """A step whose one-line description the planner wrote into its `text` field."""

    def describe(self) -> str:
        return self.text  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Register(Step):
    source: str = ""
    cycle: int | None = None
    nfiles: int = 0
    size: int = 0
    phase = "version"
    action = "register"

    def describe(self) -> str:
        return (
            f"register {self.source} as {self.version}: copy {self.nfiles} files "
            f"({human_bytes(self.size)}) into the store, record in manifest.json"
        )

    def run_global(self, run: RunState, target: Any) -> None:
        from adapterctl.registration import register_version

        vid, created = register_version(
            run.cfg, self.model, Path(self.source), self.cycle, run.clock, run.identity, expect=target
        )
        run.progress(
            f"{self.model}: registered {vid}" if created else f"{self.model}: {vid} already registered"
        )


@dataclass(frozen=True)
class Convert(Texted, Step):
    key: str | None = None
    spec: Any = None  # convert.ConvertSpec (frozen)
    base_dir: str | None = None
    base_digest: str | None = None
    store_dir: str = ""
    files: Files = ()  # the version's PEFT files (the conversion's input)
    writes: int = 0  # bytes the conversion will write into the cache here (0: cached or none)
    text: str = ""
    phase = "convert"
    action = "convert"

    def run(self, ctx: StepContext) -> None:
        """Build (or take from the cache, re-hashed) the artifact this endpoint's kind loads. Endpoints
        that want the same artifact share it: the first builds it under a per-key lock."""

        out, run = ctx.outcome, ctx.run
        if self.key is None:
            out.convert = "peft"
            return
        with run.convert_lock(self.key):
            artifact, how = run.artifacts.get(self.key), "cached"
            if self.key in run.convert_failed:
                raise run.convert_failed[self.key]
            if artifact is None:
                artifact, how = self._build(ctx)
        out.convert = how
        out.artifact = artifact.record() | {"dir": str(artifact.dir)}
        fid = artifact.meta.get("fidelity") or {}
        checked = (
            "; fidelity "
            + ", ".join(
                f"{r['artifact']} {r['identical']}/{fid['cases']} token-identical"
                for r in fid.get("results", [])
            )
            if fid.get("checked")
            else f"; fidelity not checked ({fid.get('reason', 'disabled')})"
        )
        n = len(artifact.files)
        ctx.say(
            f"convert: {self.spec.label} {how} ({human_bytes(artifact.size_bytes)}, "
            f"{n} file{'s' * (n != 1)}){checked}"
        )

    def _build(self, ctx: StepContext) -> tuple[Any, str]:
        from adapterctl import convert
        from adapterctl.manifest import locked

        run = ctx.run
        base_dir = Path(self.base_dir) if self.base_dir else None
        # the base's file hashes are cached here (planning writes nothing); it must not have changed
        if base_dir and convert.base_digest(base_dir, run.cfg.store) != self.base_digest:
            raise PhaseError(
                f"{self.model}: base model {base_dir} changed since the plan was made",
                "run the command again",
            )
        job = convert.Job(
            self.model,
            self.version,
            self.spec,
            Path(self.store_dir),
            dict(self.files),
            base_dir,
            self.base_digest,
            convert.fidelity_spec(run.cfg.models[self.model], run.cfg.path.parent),
        )
        if job.key() != self.key:
            raise PhaseError(
                f"{self.model} {self.version}: the conversion inputs changed since the plan was made",
                "run the command again",
            )
        try:
            artifact, how = convert.run(job, convert.Cache(run.cfg.store), ctx.say)
        except AdapterctlError as exc:
            run.convert_failed[self.key] = exc
            raise
        run.artifacts[self.key] = artifact
        with locked(run.cfg.store) as manifest:
            entry = manifest.version(self.model, self.version)
            if entry is not None:
                entry.setdefault("artifacts", {})[artifact.key] = artifact.record()
        return artifact, how


@dataclass(frozen=True)
class Lock(Step):
    adapter_dir: str = ""
    phase = "lock"
    action = "lock"

    def describe(self) -> str:
        lock = f"{self.adapter_dir}/.adapterctl.lock"
        return f"take the endpoint lock {lock}; finish what an interrupted command left"


@dataclass(frozen=True)
class Unlock(Step):
    phase = "lock"
    action = "unlock"

    def describe(self) -> str:
        return "release the endpoint lock"


@dataclass(frozen=True)
class VerifyRelease(Step):
    files: Files | None = None
    key: str | None = None
    src: str | None = None
    what: str = ""
    phase = "transfer"
    action = "verify_release"

    def describe(self) -> str:
        head = f"releases/{self.version} already on endpoint"
        return f"{head}: re-verify sha256 of {self.what} there (0 bytes to send)"

    def run(self, ctx: StepContext) -> None:
        ctx.transport.call(
            "verify_release",
            adapter_dir=ctx.ep.adapter_dir,
            model=self.model,
            version=self.version,
            files=ctx.run.artifact_files(self)[0],
        )
        ctx.say(f"releases/{self.version} present, hashes verified on the endpoint")


@dataclass(frozen=True)
class Transfer(Texted, Step):
    files: Files | None = None  # None: the conversion's output, known once it ran
    key: str | None = None
    src: str | None = None
    link_from: str | None = None  # the newest release: unchanged files are hard-linked from it
    delta: bool = False  # changed files go as rsync deltas against link_from's copies
    nbytes: int = 0  # what the plan expects to send
    text: str = ""
    phase = "transfer"
    action = "transfer"
    journaled = True

    @property
    def bytes(self) -> int:
        return self.nbytes

    def run(self, ctx: StepContext) -> None:
        from adapterctl.transfer import send_release

        send_release(ctx, self)


@dataclass(frozen=True)
class Publish(Step):
    files: Files | None = None
    key: str | None = None
    src: str | None = None
    link_from: str | None = None
    what: str = ""
    phase = "transfer"
    action = "publish"
    journaled = True

    def describe(self) -> str:
        return (
            f"sha256 of {self.what} computed on the endpoint, compared with the manifest; "
            f"staging/{self.version}.tmp → releases/{self.version}"
        )

    def run(self, ctx: StepContext) -> None:
        from adapterctl.transfer import publish_release

        publish_release(ctx, self)


@dataclass(frozen=True)
class RememberBaseGguf(Step):
    path: str = ""
    stamp: str | None = None
    sha256: str | None = None
    phase = "transfer"
    action = "remember_base_gguf"

    def describe(self) -> str:
        return (
            f"record {self.path}'s sha256 there by size, mtime and inode: the next deploy reads it "
            "instead of hashing the base GGUF again"
        )

    def run(self, ctx: StepContext) -> None:
        try:  # a cache only: failing to write it must not fail the deploy
            ctx.transport.call(
                "remember_base_gguf",
                adapter_dir=ctx.ep.adapter_dir,
                path=self.path,
                stamp=self.stamp,
                sha256=self.sha256,
            )
        except AdapterctlError as exc:
            ctx.say(f"warning: could not record the base GGUF's sha256: {exc}")


@dataclass(frozen=True)
class HealthPlan:
    """A health check decided at plan time: the suite, the engine spec resolved for the endpoint, and
    the release it exercises."""

    suite: str
    suite_dir: str  # where a relative suite path is resolved (the config's directory)
    spec: HealthSpec
    release: str  # `releases/{id}`, `active`, or a path on this machine (local)
    local: bool = False
    text: str = ""


@dataclass(frozen=True)
class HealthCheck(Step):
    health: HealthPlan | None = None
    skip: str | None = None  # why this check does not run (no suite; live-only engine)
    key: str | None = None  # --health-local of a conversion made in this run: its cache entry
    phase = "health-check"
    action = "health"

    def describe(self) -> str:
        return self.skip or (self.health.text if self.health else "")

    def run(self, ctx: StepContext) -> None:
        from adapterctl.verify import run_health

        if self.health is None:
            if self.skip and "skipped" in self.skip:
                ctx.say(self.skip)
            return
        result = run_health(ctx, self.health, self.key)
        ctx.outcome.health["pre_activation"] = result
        if not result["all_passed"]:
            from adapterctl.verify import health_message

            raise HealthCheckFailed(health_message(ctx, self.version, result))


@dataclass(frozen=True)
class CheckService(Step):
    pidfile: str = ""
    now: str = ""  # what the facts said when planning
    phase = "activate"
    action = "check_service"

    def describe(self) -> str:
        return self.now

    def run(self, ctx: StepContext) -> None:
        state = ctx.transport.call("check_pidfile", pidfile=self.pidfile)
        if not state["alive"]:
            raise PhaseError(
                f"endpoint {self.endpoint}: {state['error']}; nothing was swapped",
                "start the serving process (it writes the pidfile), or set reload_method: none",
            )


@dataclass(frozen=True)
class Swap(Step):
    """Point `previous` then `active` at their releases, one rename(2) each (None removes a link)."""

    active: str | None = None
    previous: str | None = None
    status: str = "verifying"  # health_status recorded after the swap
    why: str = ""
    phase = "activate"
    action = "swap"
    journaled = True

    def describe(self) -> str:
        head = f"previous → {self.previous or '(none)'}, active → {self.active or '(base model, no adapter)'}"
        return f"{head} (rename(2) of each link){self.why}"

    def run(self, ctx: StepContext) -> None:
        old = ctx.transport.call(
            "swap_links",
            adapter_dir=ctx.ep.adapter_dir,
            model=self.model,
            active=self.active,
            previous=self.previous,
        )
        ctx.say(f"active → {self.active or '(no adapter)'} (was {old['active'] or 'none'})")
        ctx.status_update(
            {"active_version": self.active, "previous_version": self.previous, "health_status": self.status}
        )


@dataclass(frozen=True)
class CompatLink(Step):
    link: str = ""
    phase = "activate"
    action = "compat_link"
    journaled = True

    def describe(self) -> str:
        return f"link {self.link} → {self.model}/active"

    def run(self, ctx: StepContext) -> None:
        ctx.transport.call(
            "set_compat_link",
            link=self.link,
            target=f"{ctx.ep.adapter_dir}/{self.model}/active",
            root=os.path.dirname(ctx.ep.adapter_dir.rstrip("/")),
        )


@dataclass(frozen=True)
class Reload(Step):
    """Make the service load what `active` points at, then confirm it reports `expect`."""

    driver: ReloadDriver | None = None
    expect: str | None = None
    compensating: bool = False  # the rollback of a failed activation: skip when the old service still serves
    phase = "activate"
    action = "reload"
    journaled = True

    def describe(self) -> str:
        return self.driver.describe(self.expect)

    def run(self, ctx: StepContext) -> None:
        driver = self.driver
        if self.compensating and driver.still_serving(ctx, ctx.outcome.restarted, self.expect):
            return
        trig = driver.trigger(ctx)
        ctx.outcome.restarted = ctx.outcome.restarted or trig.restarted
        driver.confirm(ctx, trig, self.expect)


@dataclass(frozen=True)
class Verify(Texted, Step):
    """Check the live release; in a deploy a failure rolls back (the transaction's compensation)."""

    health: HealthPlan | None = None
    discriminator: str | None = None
    report_only: bool = False  # a manual rollback: report, never undo
    base: bool = False  # rolled back to the base model: the reload confirmation was the check
    text: str = ""
    phase = "verify"
    action = "verify"
    journaled = True  # its `done` record is what tells recovery the version was verified

    def run(self, ctx: StepContext) -> None:
        from adapterctl.verify import verify_live

        verify_live(ctx, self)


@dataclass(frozen=True)
class MarkGood(Step):
    """Record in status.json that the version passed verify (the last step of a deploy)."""

    phase = "verify"
    action = "mark_good"

    def describe(self) -> str:
        return f"record {self.version} as healthy and last-good in status.json"

    def run(self, ctx: StepContext) -> None:
        ctx.status_update(
            {
                "health_status": "healthy",
                "last_good_version": self.version,
                "last_verified": iso(ctx.run.clock()),
            }
        )


@dataclass(frozen=True)
class Prune(Step):
    names: tuple[str, ...] = ()
    keep: int = 5
    phase = "prune"
    action = "prune"

    def describe(self) -> str:
        names = ", ".join(self.names)
        old = f"remove old releases {names} (keep {self.keep}; never what active/previous point to)"
        return (old + "; " if self.names else "") + "remove abandoned staging dirs"

    def run(self, ctx: StepContext) -> None:
        try:  # cleanup only: a failure here must never undo a verified release
            removed = ctx.transport.call(
                "prune", adapter_dir=ctx.ep.adapter_dir, model=self.model, names=list(self.names)
            )
        except TransportError as exc:
            ctx.say(f"warning: pruning old releases failed: {exc}")
            return
        if removed:
            ctx.say(f"pruned {', '.join(removed)}")
