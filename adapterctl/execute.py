"""Run a Plan's steps, exactly those, and record what happened (DESIGN §5).

A failing step ends its (endpoint, model) pipeline; other pairs go on. After `swap` has
moved `active`, any failure of a deploy rolls that pair back by itself (exit 5).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterctl import __version__
from adapterctl.config import Config, EndpointConfig
from adapterctl.endpoint_ops import pid_alive
from adapterctl.errors import (
    EXIT_FAILURE,
    EXIT_HEALTH,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    AdapterctlError,
    HealthCheckFailed,
    LockHeld,
    PhaseError,
)
from adapterctl.plan import Plan, Step, compat_link_paths, human_bytes, loaded_file
from adapterctl.transports.base import Transport

# outcome status -> exit code; worst wins in the order of EXIT_SEVERITY
LIVE_ENGINES = ("http",)  # engines that query the running service: they can only verify after activation

STATUS_EXIT = {
    "skipped": EXIT_OK,  # a canary failure sets the exit code; the untouched endpoints add nothing
    "success": EXIT_OK,
    "noop": EXIT_OK,
    "aborted": EXIT_HEALTH,
    "rolled_back": EXIT_ROLLED_BACK,
    "locked": EXIT_LOCKED,
    "failed": EXIT_FAILURE,
}
EXIT_SEVERITY = [EXIT_OK, EXIT_HEALTH, EXIT_ROLLED_BACK, EXIT_LOCKED, EXIT_FAILURE]
_STEP_VERSION: Any = object()  # do_reload's default: expect the step's version (None means no adapter)


@dataclass(frozen=True)
class Identity:
    """Who runs adapterctl, for locks and logs (passed in so tests can freeze it)."""

    user: str
    host: str
    pid: int

    @classmethod
    def current(cls) -> Identity:
        import getpass

        return cls(getpass.getuser(), socket.gethostname(), os.getpid())


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """The result of one (endpoint, model) pipeline."""

    endpoint: str
    model: str
    version: str | None
    status: str = "success"
    phases_completed: list[str] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    swapped: tuple[str | None, str | None] | None = None  # links to restore if a deploy fails after swap
    restarted: bool = False  # reload_method restart: the service manager restarted the service
    convert: str | None = None  # peft | cached | built | rebuilt (...): what the convert step did
    artifact: dict[str, Any] | None = None  # the converted artifact's manifest record, with its dir

    @property
    def done(self) -> bool:
        return self.status != "success"


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


@dataclass
class Report:
    plan: Plan
    outcomes: list[Outcome]
    exit_code: int
    dry_run: bool = False


def worst(codes: list[int]) -> int:
    return max(codes, key=EXIT_SEVERITY.index, default=EXIT_OK)


class _Run:
    def __init__(self, plan: Plan, ctx: RunContext):
        self.plan, self.ctx, self.cfg = plan, ctx, ctx.cfg
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.locked: set[str] = set()
        self.lock_failed: dict[str, tuple[str, str]] = {}  # endpoint -> (outcome status, why)
        self.failed_models: dict[str, str] = {}
        self.registered: dict[str, threading.Event] = {}  # model -> set once its version step ended
        self.artifacts: dict[str, Any] = {}  # conversion key -> convert.Artifact built or verified here
        self.convert_locks: dict[str, threading.Lock] = {}  # one conversion per key at a time
        self.convert_guard = threading.Lock()
        self.convert_failed: dict[str, AdapterctlError] = {}  # key -> why: other endpoints do not retry
        self.manifest = None  # read on first use, after the version steps have registered

    # -- bookkeeping ------------------------------------------------------------------------
    def outcome(self, step: Step) -> Outcome:
        key = (step.endpoint, step.model)
        if key not in self.outcomes:
            out = Outcome(step.endpoint, step.model, step.version)
            if self.plan.kind == "deploy":
                out.phases_completed.append("version")
            self.outcomes[key] = out
        return self.outcomes[key]

    def say(self, step: Step, text: str) -> None:
        who = f"[{step.endpoint}] " if step.endpoint else ""
        model = f"{step.model}: " if step.model else ""
        self.ctx.progress(f"{who}{model}{text}")

    def ep(self, step: Step) -> tuple[EndpointConfig, Transport]:
        return self.cfg.endpoints[step.endpoint], self.ctx.transports[step.endpoint]

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        """Version steps on one background worker; each endpoint's steps in order, endpoints in parallel.

        An endpoint's step for a model waits until that model's version step is done, so model A
        is already on the wire while model B is still being copied into the store. With a canary,
        its endpoint runs alone first; the others run only if every one of its pipelines
        succeeded (or had nothing to do), else they are marked skipped, untouched.
        """
        from concurrent.futures import ThreadPoolExecutor

        groups: dict[str, list[Step]] = {}
        versions: list[Step] = []
        for step in self.plan.steps:
            (versions if step.endpoint is None else groups.setdefault(step.endpoint, [])).append(step)
        self.registered = {s.model: threading.Event() for s in versions}
        with ThreadPoolExecutor(max_workers=1) as registrar:
            done = [registrar.submit(self.run_global, s) for s in versions]
            self.run_endpoints(groups)
            for future in done:
                future.result()  # an unexpected error in a version step surfaces here, not silently
        return list(self.outcomes.values())

    def run_endpoints(self, groups: dict[str, list[Step]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        rest = list(groups)
        canary = self.plan.canary
        if canary in groups:
            rest.remove(canary)
            self.run_endpoint(groups[canary])
            bad = [
                o
                for o in self.outcomes.values()
                if o.endpoint == canary and o.status not in ("success", "noop")
            ]
            if bad:
                why = f"canary {canary} did not pass ({bad[0].status}): this endpoint was not touched"
                for name in rest:
                    for s in groups[name]:
                        if s.model:
                            o = self.outcome(s)
                            o.status, o.error = "skipped", why
                rest = []
        with ThreadPoolExecutor(max_workers=max(1, min(self.ctx.parallel, len(rest) or 1))) as pool:
            list(pool.map(self.run_endpoint, (groups[n] for n in rest)))

    def run_endpoint(self, steps: list[Step]) -> None:
        """One endpoint's steps in order: a failed step ends its (endpoint, model) pipeline only."""
        for step in steps:
            if step.action == "unlock":
                self.unlock(step)
                continue
            if step.endpoint in self.lock_failed:
                status, why = self.lock_failed[step.endpoint]
                if step.model:
                    o = self.outcome(step)
                    o.status, o.error = status, why
                continue
            if step.action == "lock":
                self.lock(step)
                continue
            if step.model in self.registered:
                self.registered[step.model].wait()
            out = self.outcome(step)
            if step.model in self.failed_models and self.plan.kind == "deploy":
                if not out.done:
                    out.status, out.error = "failed", self.failed_models[step.model]
                continue
            if out.done:
                continue
            try:
                if self.ctx.board is not None:
                    self.ctx.board.phase(step.endpoint, f"{step.model or ''} {step.phase}".strip())
                getattr(self, "do_" + step.action)(step, out)
                if step.phase not in out.phases_completed and step.phase not in ("lock", "prune"):
                    out.phases_completed.append(step.phase)
            except AdapterctlError as exc:
                self.fail(step, out, exc)

    def fail(self, step: Step, out: Outcome, exc: AdapterctlError) -> None:
        out.error = str(exc)
        if out.swapped is not None and self.plan.kind == "deploy":
            self.say(step, f"FAILED in {step.phase}: {exc}")
            self.auto_rollback(step, out, exc)
            return
        if isinstance(exc, HealthCheckFailed):
            out.status = "aborted"
            self.say(step, f"ABORTED, active untouched: {exc.message}")
            self.status_update(
                step,
                {
                    "last_aborted": {
                        "version": step.version,
                        "reason": exc.message,
                        "at": iso(self.ctx.clock()),
                    }
                },
            )
            return
        self.say(step, f"FAILED in {step.phase}: {exc}")
        out.status = "failed"

    # -- version phase ----------------------------------------------------------------------
    def run_global(self, step: Step) -> None:
        try:
            getattr(self, "do_" + step.action)(step)
        except AdapterctlError as exc:
            self.failed_models[step.model] = str(exc)
            self.ctx.progress(f"{step.model}: FAILED in {step.phase}: {exc}")
        finally:
            self.registered[step.model].set()

    def do_register(self, step: Step) -> None:
        from adapterctl.api import register_version

        target = next(t for t in self.plan.targets if t.model == step.model)
        vid, created = register_version(
            self.cfg,
            step.model,
            Path(step.arg("source")),
            self.plan.cycle,
            self.ctx.clock,
            self.ctx.identity,
            expect=target,
        )
        self.ctx.progress(
            f"{step.model}: registered {vid}" if created else f"{step.model}: {vid} already registered"
        )

    # -- locks ------------------------------------------------------------------------------
    def lock(self, step: Step) -> None:
        ep, tr = self.ep(step)
        ident = self.ctx.identity
        holder = {
            "user": ident.user,
            "host": ident.host,
            "pid": ident.pid,
            "deployment_id": self.plan.deployment_id,
            "started_at": iso(self.ctx.clock()),
            "command": self.ctx.command,
        }
        try:
            got = tr.call("lock_acquire", adapter_dir=ep.adapter_dir, holder=holder)
            if not got["acquired"]:
                h = got["holder"]
                dead = (
                    h.get("host") == ident.host and isinstance(h.get("pid"), int) and not pid_alive(h["pid"])
                )
                old = self.ctx.break_lock and got["age_s"] > self.cfg.lock_stale_after_s
                if dead or old:
                    why = (
                        f"its holder pid {h.get('pid')} on {h.get('host')} is gone"
                        if dead
                        else (f"it is {got['age_s']:.0f} s old and --break-lock was given")
                    )
                    self.say(step, f"breaking the lock of deployment {h.get('deployment_id')}: {why}")
                    got = tr.call(
                        "lock_acquire",
                        adapter_dir=ep.adapter_dir,
                        holder=holder,
                        break_id=h.get("deployment_id"),
                    )
                    self.log_line(
                        {
                            "action": "break_lock",
                            "endpoint": ep.name,
                            "status": "success",
                            "broken_holder": h,
                            "reason": why,
                        }
                    )
            if not got["acquired"]:
                h = got["holder"]
                raise LockHeld(
                    f"endpoint {ep.name}: locked by {h.get('user')}@{h.get('host')} pid {h.get('pid')} since "
                    f"{h.get('started_at')} (deployment {h.get('deployment_id')}, {got['age_s']:.0f} s ago)",
                    f"wait for it to finish; if it is gone, rerun with --break-lock "
                    f"(allowed after {self.cfg.lock_stale_after_s:g} s)",
                )
            self.locked.add(ep.name)
        except AdapterctlError as exc:
            self.lock_failed[ep.name] = ("locked" if isinstance(exc, LockHeld) else "failed", str(exc))
            self.say(step, f"FAILED: {exc}")

    def unlock(self, step: Step) -> None:
        if step.endpoint in self.locked:
            ep, tr = self.ep(step)
            try:
                tr.call("lock_release", adapter_dir=ep.adapter_dir, deployment_id=self.plan.deployment_id)
            except AdapterctlError as exc:
                self.say(step, f"could not release the lock: {exc}")
            self.locked.discard(step.endpoint)

    # -- pipeline steps ---------------------------------------------------------------------
    def do_convert(self, step: Step, out: Outcome) -> None:
        """Build (or take from the cache, re-hashed) the artifact this endpoint's kind loads.

        Endpoints that want the same artifact share it: the first builds it, under a per-key lock,
        the others find it in the cache. The manifest records it next to the version."""
        from adapterctl import convert

        key = step.arg("key")
        if key is None:
            out.convert = "peft"
            return
        with self.convert_guard:
            lock = self.convert_locks.setdefault(key, threading.Lock())
        with lock:
            artifact = self.artifacts.get(key)
            how = "cached"
            if key in self.convert_failed:
                raise self.convert_failed[key]
            if artifact is None:
                m = self.cfg.models[step.model]
                target = next(t for t in self.plan.targets if t.model == step.model)
                base_dir = step.arg("base_dir")
                # the base's file hashes are cached here (planning writes nothing); it must not have changed
                if base_dir and convert.base_digest(Path(base_dir), self.cfg.store) != step.arg(
                    "base_digest"
                ):
                    raise PhaseError(
                        f"{step.model}: base model {base_dir} changed since the plan was made",
                        "run the command again",
                    )
                job = convert.Job(
                    step.model,
                    step.version,
                    step.arg("spec"),
                    target.store_dir,
                    dict(target.files),
                    Path(base_dir) if base_dir else None,
                    step.arg("base_digest"),
                    convert.fidelity_spec(m, self.cfg.path.parent),
                )
                if job.key() != key:
                    raise PhaseError(
                        f"{step.model} {step.version}: the conversion inputs changed since the plan was made",
                        "run the command again",
                    )
                try:
                    artifact, how = convert.run(
                        job, convert.Cache(self.cfg.store), lambda line: self.say(step, line)
                    )
                except AdapterctlError as exc:
                    self.convert_failed[key] = exc
                    raise
                self.artifacts[key] = artifact
                self.record_artifact(step, artifact)
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
        self.say(
            step,
            f"convert: {step.arg('spec').label} {how} ({human_bytes(artifact.size_bytes)}, "
            f"{len(artifact.files)} file{'s' * (len(artifact.files) != 1)}){checked}",
        )

    def record_artifact(self, step: Step, artifact: Any) -> None:
        from adapterctl.manifest import locked

        with locked(self.cfg.store) as manifest:
            entry = manifest.version(step.model, step.version)
            if entry is not None:
                entry.setdefault("artifacts", {})[artifact.key] = artifact.record()

    def artifact_files(self, step: Step) -> tuple[dict[str, str], str | None]:
        """(files, source dir) a transfer/publish/verify step ships: the plan's, or the conversion's."""
        files, key = step.arg("files"), step.arg("key")
        if files is not None:
            return files, step.arg("src")
        artifact = self.artifacts.get(key)
        if artifact is None:
            raise PhaseError(
                f"{step.model} {step.version}: no conversion output for {key} (bug: convert did not run)"
            )
        return dict(artifact.files), str(artifact.dir)

    def do_verify_release(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        tr.call(
            "verify_release",
            adapter_dir=ep.adapter_dir,
            model=step.model,
            version=step.version,
            files=self.artifact_files(step)[0],
        )
        self.say(step, f"releases/{step.version} present, hashes verified on the endpoint")

    def do_transfer(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        files, src = self.artifact_files(step)
        link = step.arg("link_dest")
        prep = tr.call(
            "prepare_staging",
            adapter_dir=ep.adapter_dir,
            model=step.model,
            version=step.version,
            files=files,
            link_from=link,
            drop_partial=bool(link and step.arg("delta")),
        )
        try:
            board = self.ctx.board
            progress = (lambda n: board.advance(step.endpoint, n)) if board is not None else None
            basis = f"{ep.adapter_dir}/{step.model}/releases/{link}" if link and step.arg("delta") else None
            result = tr.sync_files(Path(src), prep["path"], prep["send"], basis, progress)
        except AdapterctlError:
            tr.call("remove_staging", adapter_dir=ep.adapter_dir, model=step.model, version=step.version)
            raise
        out.bytes_sent += result.bytes_sent
        resumed = f", {len(prep['kept'])} already staged" if prep["kept"] else ""
        self.say(
            step,
            f"sent {result.files_sent} files ({result.bytes_sent} bytes), "
            f"linked {len(prep['linked'])} unchanged{resumed}",
        )

    def do_publish(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        target = next((t for t in self.plan.targets if t.model == step.model), None)
        files = self.artifact_files(step)[0]
        artifact = self.artifacts.get(step.arg("key"))
        meta = {
            "created": iso(self.ctx.clock()),
            "sha256": target.files.get("adapter_model.safetensors") if target else None,
            "deployment_id": self.plan.deployment_id,
            "cycle": target.cycle if target else None,
            "format": artifact.meta.get("format") if artifact else "peft",
        }
        if artifact is not None:
            meta["artifact"] = {
                k: artifact.meta.get(k) for k in ("key", "kind", "quant", "tools", "base_digest")
            }
        tr.call(
            "finalize_release",
            adapter_dir=ep.adapter_dir,
            model=step.model,
            version=step.version,
            files=files,
            meta=meta,
        )
        self.say(step, f"hashes verified on the endpoint; published releases/{step.version}")

    def do_remember_base_gguf(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        try:  # a cache only: failing to write it must not fail the deploy
            tr.call(
                "remember_base_gguf",
                adapter_dir=ep.adapter_dir,
                path=step.arg("path"),
                stamp=step.arg("stamp"),
                sha256=step.arg("sha256"),
            )
        except AdapterctlError as exc:
            self.say(step, f"warning: could not record the base GGUF's sha256: {exc}")

    def do_health(self, step: Step, out: Outcome) -> None:
        result = self.health(step, f"releases/{step.version}")
        if result is not None:
            out.health["pre_activation"] = result
            if not result["all_passed"]:
                raise HealthCheckFailed(self.health_message(step, result))

    def do_check_service(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        state = tr.call("check_pidfile", pidfile=ep.pidfile)
        if not state["alive"]:
            raise PhaseError(
                f"endpoint {ep.name}: {state['error']}; nothing was swapped",
                "start the serving process (it writes the pidfile), or set reload_method: none",
            )

    def do_swap(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        old = tr.call(
            "swap_links",
            adapter_dir=ep.adapter_dir,
            model=step.model,
            active=step.arg("active"),
            previous=step.arg("previous"),
        )
        # where an automatic rollback goes: the plan's choice (last-good), else the old links
        out.swapped = (
            step.arg("restore_active", old["active"]),
            step.arg("restore_previous", old["previous"]),
        )
        self.say(step, f"active → {step.arg('active')} (was {old['active'] or 'none'})")
        self.status_update(
            step,
            {
                "active_version": step.arg("active"),
                "previous_version": step.arg("previous"),
                "health_status": "verifying" if self.plan.kind == "deploy" else "unverified",
            },
        )

    def do_compat_link(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        tr.call(
            "set_compat_link",
            link=step.arg("link"),
            target=f"{ep.adapter_dir}/{step.model}/active",
            root=os.path.dirname(ep.adapter_dir.rstrip("/")),
        )

    def do_reload(self, step: Step, out: Outcome, version: Any = _STEP_VERSION) -> None:
        """Make the service load what `active` points at now, and confirm it (loaded.json).

        `version`: what the service must then report (None = no adapter); default the step's.
        """
        ep, tr = self.ep(step)
        expect = step.version if version is _STEP_VERSION else version
        if ep.reload_method == "none":
            return
        if ep.reload_method == "restart":
            self.restart(step, out, expect)
            return
        path, before = self.report(step)
        pid = tr.call("signal_pidfile", pidfile=ep.pidfile)
        self.status_update(step, {"last_reload": iso(self.ctx.clock())})
        if before is None or before.get("model", step.model) != step.model:
            why = "no loaded.json" if before is None else f"loaded.json speaks for {before.get('model')}"
            self.say(step, f"SIGUSR1 sent to pid {pid} ({why}: reload of {step.model} not confirmed)")
            return
        now = self.await_report(
            step, path, before, ("seq", "loaded_at"), expect, f"pid {pid} did not confirm the reload"
        )
        self.say(step, f"pid {now.get('pid', pid)} confirmed it loaded {expect or 'no adapter'}")

    def report(self, step: Step) -> tuple[str | None, dict[str, Any] | None]:
        """(path, content) of the service's report for this model: loaded.<model>.json when the
        service writes one (several models, one process), else loaded.json."""
        ep, tr = self.ep(step)
        path = loaded_file(ep, step.model)
        if path is None:
            return None, None
        content = tr.call("read_json", path=path)
        if content is None:
            path = loaded_file(ep)
            content = tr.call("read_json", path=path)
        return path, content

    def restart(self, step: Step, out: Outcome, expect: str | None) -> None:
        """reload_method restart: systemctl restart / launchctl kickstart -k on the endpoint, then confirm.

        The restarted process has a new pid and starts counting `seq` at 1 again, so a fresh report
        is one whose pid, seq or loaded_at differs from the one read before the restart.
        """
        ep, tr = self.ep(step)
        path, before = self.report(step)
        res = tr.call(
            "restart_service", unit=ep.unit, manager=step.arg("manager"), timeout_s=ep.reload_timeout_s
        )
        command = " ".join(res["argv"])
        self.status_update(step, {"last_reload": iso(self.ctx.clock())})
        if res["rc"] != 0:
            tail = " ".join((res.get("stderr") or res.get("stdout") or "").strip().splitlines()[-3:])
            exit_text = "timed out" if res["rc"] is None else f"exit {res['rc']}"
            raise PhaseError(
                f"endpoint {ep.name}: `{command}` failed ({exit_text}) for unit {ep.unit}: "
                f"{tail or 'no output'}",
                f"check the unit on the endpoint (`{res['argv'][0]} status {ep.unit}` or its log)",
            )
        out.restarted = True
        if before is None or before.get("model", step.model) != step.model:
            why = (
                "no loaded.json beside the pidfile"
                if before is None
                else f"loaded.json speaks for {before.get('model')}"
            )
            self.say(step, f"`{command}` done ({why}): restart not confirmed")
            return
        now = self.await_report(
            step,
            path,
            before,
            ("pid", "seq", "loaded_at"),
            expect,
            f"the restarted service ({ep.unit}) did not report what it loaded",
        )
        self.say(
            step,
            f"`{command}`: new pid {now.get('pid')} (was {before.get('pid')}) "
            f"confirmed it loaded {expect or 'no adapter'}",
        )

    def await_report(
        self,
        step: Step,
        path: str,
        before: dict[str, Any],
        keys: tuple[str, ...],
        expect: str | None,
        late: str,
    ) -> dict[str, Any]:
        """Wait ≤ reload_timeout_s for a loaded.json whose `keys` differ from `before`; check it reports
        `expect` (None = no adapter). Raises PhaseError when late or wrong."""
        ep, tr = self.ep(step)
        deadline = time.monotonic() + ep.reload_timeout_s
        while True:
            now = tr.call("read_json", path=path) or {}
            if now and any(now.get(k) != before.get(k) for k in keys):
                break
            if time.monotonic() > deadline:
                raise PhaseError(
                    f"endpoint {ep.name}: {late} within {ep.reload_timeout_s:g} s ({path} unchanged)",
                    "check the service log; raise reload_timeout_s if it is just slow",
                )
            time.sleep(0.05)
        if not now.get("ok", True) or now.get("version_id") != expect:
            raise PhaseError(
                f"endpoint {ep.name}: the service reports {now.get('version_id') or 'no adapter'} "
                f"loaded, expected {expect or 'no adapter'}: {now.get('error') or 'wrong version'}"
            )
        known = self.weights_sha(step.model, expect)
        if expect and known and now.get("sha256") and now["sha256"] != known:
            raise PhaseError(
                f"endpoint {ep.name}: the service reports {expect} loaded, but with sha256 "
                f"{now['sha256'][:12]}… where the manifest has {known[:12]}…: it did not load these bytes"
            )
        return now

    def weights_sha(self, model: str, version: str | None) -> str | None:
        """The manifest's sha256 of a version's weights (identity check of a reload), None if unknown."""
        from adapterctl.manifest import Manifest

        if version is None:
            return None
        entry = self.manifest.version(model, version) if self.manifest else None
        if entry is None:  # registered during this run (version steps run alongside): read again
            self.manifest = Manifest.load(self.cfg.store)
            entry = self.manifest.version(model, version)
        return entry["sha256"] if entry else None

    def do_verify(self, step: Step, out: Outcome) -> None:
        if step.arg("base"):
            self.say(step, "base model: health suite not applicable (the reload was confirmed above)")
            self.status_update(step, {"health_status": "base_model"})
            return
        result = self.health(step, "active")
        if result is None:
            if not step.arg("report_only"):
                self.mark_good(step)
            return
        out.health["post_activation"] = result
        if result["all_passed"] and self.cfg.models[step.model].health.discriminator:
            result["discriminator"] = disc = self.discriminate(step)
            if not disc["differs"]:
                result["all_passed"] = False
                result["error"] = (
                    f"the live service answers {disc['input']!r} exactly like the base model "
                    f"({disc['output']!r}): the adapter is loaded but ignored"
                )
        if result["all_passed"]:
            self.mark_good(step)
            return
        message = self.health_message(step, result)
        if step.arg("report_only"):
            self.status_update(step, {"health_status": "unhealthy"})
            raise PhaseError(message, "the rollback stands; choose another release with --to VERSION")
        raise HealthCheckFailed(message)

    def do_prune(self, step: Step, out: Outcome) -> None:
        ep, tr = self.ep(step)
        try:  # cleanup only: a failure here must never undo a verified release
            removed = tr.call(
                "prune", adapter_dir=ep.adapter_dir, model=step.model, names=list(step.arg("names"))
            )
        except AdapterctlError as exc:
            self.say(step, f"warning: pruning old releases failed: {exc}")
            return
        if removed:
            self.say(step, f"pruned {', '.join(removed)}")

    # -- helpers ----------------------------------------------------------------------------
    def health_target(self, step: Step, where: str):
        from adapterctl.health import HealthTarget

        ep, tr = self.ep(step)
        local = step.arg("local")
        if local == "@artifact":  # the conversion ran in this run: its cache entry
            local = self.artifact_files(step)[1]
        if local is not None and where != "active":  # --health-local: this machine, the store copy
            from adapterctl.transports.local import LocalTransport

            return HealthTarget(
                endpoint=ep.name,
                model=step.model,
                version_id=step.version or "",
                release_path=local,
                adapter_dir=str(self.cfg.store),
                base_model=self.cfg.models[step.model].base_model,
                transport=LocalTransport(f"{ep.name} (local health)"),
            )
        return HealthTarget(
            endpoint=ep.name,
            model=step.model,
            version_id=step.version or "",
            release_path=f"{ep.adapter_dir}/{step.model}/{where}",
            adapter_dir=ep.adapter_dir,
            base_model=self.cfg.models[step.model].base_model,
            transport=tr,
        )

    def engine_spec(self, step: Step) -> dict[str, Any]:
        """The model's health spec on this endpoint: engine auto resolved, the artifact's defaults."""
        from adapterctl import convert
        from adapterctl.health.engines import spec_for_endpoint

        ep = self.cfg.endpoints[step.endpoint]
        fmt = convert.spec_for(self.cfg.models[step.model], ep).format
        base_gguf = ep.base_gguf.path if ep.base_gguf else None
        m = self.cfg.models[step.model]
        spec = spec_for_endpoint(asdict(m.health), ep.kind, fmt, base_gguf)
        if step.arg("local") and spec.get("engine") == "mlx" and fmt != "fused" and m.base_dir:
            spec["base"] = str(m.base_dir)  # --health-local: the base model on this machine
        return spec

    def health(self, step: Step, where: str) -> dict[str, Any] | None:
        from adapterctl.health import make_engine, resolve_suite, run_suite

        ep, tr = self.ep(step)
        spec = self.cfg.models[step.model].health
        if spec is None or spec.suite == "none":
            return None
        if spec.engine in LIVE_ENGINES and where != "active" and step.arg("local") is None:
            self.say(
                step, f"health-check {where}: skipped, the {spec.engine} engine only sees the live service"
            )
            return None
        suite = resolve_suite(spec.suite, self.cfg.path.parent)
        result = run_suite(suite, make_engine(self.engine_spec(step)), self.health_target(step, where))
        d = result.to_dict()
        verdict = "passed" if result.all_passed else f"FAILED ({len(result.failures)} of {d['cases']})"
        self.say(
            step,
            f"health-check {where}: {verdict}, p50 {d['latency_p50_ms']:.1f} ms, "
            f"p95 {d['latency_p95_ms']:.1f} ms",
        )
        return d

    def discriminate(self, step: Step) -> dict[str, Any]:
        """Ask the live release and the base model the discriminator prompt; compare normalized answers."""
        import unicodedata

        from adapterctl.health import make_engine

        spec = self.cfg.models[step.model].health
        target = self.health_target(step, "active")
        answers = []
        for engine in (
            make_engine(self.engine_spec(step)),
            make_engine({"command": spec.base_command, "timeout_s": spec.timeout_s, "env": spec.env}),
        ):
            with engine:
                engine.start(target)
                answers.append(engine.generate(spec.discriminator))
        norm = [unicodedata.normalize("NFC", a).casefold().strip() for a in answers]
        self.say(step, f"discriminator {spec.discriminator!r}: live {answers[0]!r}, base {answers[1]!r}")
        return {
            "input": spec.discriminator,
            "output": answers[0],
            "base_output": answers[1],
            "differs": norm[0] != norm[1],
        }

    def health_message(self, step: Step, result: dict[str, Any]) -> str:
        """One summary line, then one line per failing sentence with its actual output."""
        lines = [f'  ✗ "{f["input"]}" → "{f["output"]}" ({f["reason"]})' for f in result["failures"]]
        head = (
            f"endpoint {step.endpoint}: {step.model} {step.version} failed its health check "
            f"({len(result['failures'])} of {result['cases']} sentences)"
        )
        if result.get("error"):
            head += f": {result['error']}"
        return "\n".join([head, *lines])

    def mark_good(self, step: Step) -> None:
        self.status_update(
            step,
            {
                "health_status": "healthy",
                "last_good_version": step.version,
                "last_verified": iso(self.ctx.clock()),
            },
        )

    def auto_rollback(self, step: Step, out: Outcome, exc: AdapterctlError) -> None:
        ep, tr = self.ep(step)
        restore_a, restore_p = out.swapped
        self.say(
            step,
            f"rolling back by itself: active → {restore_a or '(none)'}, previous → {restore_p or '(none)'}",
        )
        try:
            tr.call(
                "swap_links",
                adapter_dir=ep.adapter_dir,
                model=step.model,
                active=restore_a,
                previous=restore_p,
            )
            for path, model in compat_link_paths(ep).items():
                if model == step.model:
                    tr.call(
                        "set_compat_link",
                        link=path,
                        target=f"{ep.adapter_dir}/{step.model}/active",
                        root=os.path.dirname(ep.adapter_dir.rstrip("/")),
                    )
            if not self.still_serving(step, out, restore_a):
                self.do_reload(step, out, version=restore_a)
        except AdapterctlError as exc2:
            out.status = "failed"
            out.error = f"{exc}; ROLLBACK ALSO FAILED: {exc2}"
            self.status_update(step, {"health_status": "rollback_failed", "last_error": out.error})
            self.say(step, f"ROLLBACK FAILED: {exc2} — inspect the endpoint now")
            return
        out.status = "rolled_back"
        out.phases_completed.append("rollback")
        self.status_update(
            step,
            {
                "active_version": restore_a,
                "previous_version": restore_p,
                "health_status": "rolled_back",
                "last_failed_version": step.version,
                "last_error": str(exc),
            },
        )
        self.say(step, f"ROLLED BACK to {restore_a or '(no adapter)'}")

    def still_serving(self, step: Step, out: Outcome, version: str | None) -> bool:
        """reload_method restart, when the restart never happened (e.g. an unknown unit): is the old
        process still up and serving `version`? Then a rollback needs no restart (and no outage)."""
        ep, tr = self.ep(step)
        path, report = self.report(step)
        if ep.reload_method != "restart" or out.restarted or path is None:
            return False
        report = report or {}
        state = tr.call("check_pidfile", pidfile=ep.pidfile)
        if not (
            state["alive"]
            and report.get("pid") == state["pid"]
            and report.get("ok", True)
            and report.get("version_id") == version
        ):
            return False
        self.say(
            step,
            f"the service was not restarted: pid {state['pid']} still serves {version or 'no adapter'}",
        )
        return True

    def status_update(self, step: Step, fields: dict[str, Any]) -> None:
        ep, tr = self.ep(step)
        try:
            tr.call(
                "update_status",
                adapter_dir=ep.adapter_dir,
                endpoint=ep.name,
                model=step.model,
                fields=fields,
                now=iso(self.ctx.clock()),
            )
        except AdapterctlError as exc:
            self.say(step, f"warning: status.json not updated: {exc}")

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


def append_log(store: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to deploy_log.jsonl with a single write(2)."""
    store.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
    fd = os.open(store / "deploy_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def execute(plan: Plan, ctx: RunContext) -> Report:
    """Run every step of `plan`; write one log line per (endpoint, model) and the deployment record."""
    from adapterctl.manifest import locked

    run = _Run(plan, ctx)
    outcomes = run.run()
    for o in outcomes:
        run.log_line(
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
                "duration_s": round(time.monotonic() - o.started, 3),
            }
        )
    code = worst([STATUS_EXIT[o.status] for o in outcomes] + [EXIT_FAILURE] * bool(run.failed_models))
    if outcomes or run.failed_models:
        with locked(ctx.cfg.store) as manifest:
            for name in plan.endpoints:
                ep = ctx.cfg.endpoints[name]
                manifest.data["endpoints"][name] = {
                    k: asdict(v) if is_dataclass(v) else v
                    for k, v in vars(ep).items()
                    if v not in (None, {}, ())
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
                        f"{o.endpoint}/{o.model}": {
                            "version": o.version,
                            "status": o.status,
                            "error": o.error,
                        }
                        for o in outcomes
                    },
                    "health_check_results": {
                        f"{o.endpoint}/{o.model}": o.health for o in outcomes if o.health
                    },
                }
            )
    return Report(plan, outcomes, code)
