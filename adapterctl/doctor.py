"""`adapterctl doctor`: check every endpoint can take a deploy, and say the fix for each failure."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from adapterctl.config import Config, EndpointConfig
from adapterctl.errors import AdapterctlError
from adapterctl.facts import gather, loaded_file
from adapterctl.manifest import Manifest
from adapterctl.steps import human_bytes
from adapterctl.transports.base import Transport


@dataclass(frozen=True)
class Check:
    endpoint: str
    name: str
    result: str  # ok | FAIL | warn
    detail: str
    fix: str = ""


def _need_bytes(cfg: Config, manifest: Manifest, ep: EndpointConfig) -> int:
    """Room a deploy of each served model's newest version needs (files not shared with a release)."""
    newest = [manifest.newest(m) for m in cfg.models if ep.serves(m)]
    return sum(v["size_bytes"] for v in newest if v)


def check_endpoint(cfg: Config, ep: EndpointConfig, tr: Transport, manifest: Manifest) -> list[Check]:
    """Run the checks for one endpoint; stops early only when it cannot log in at all."""
    checks: list[Check] = []

    def add(name: str, ok: bool | None, detail: str, fix: str = "") -> None:
        checks.append(
            Check(ep.name, name, "ok" if ok else "warn" if ok is None else "FAIL", detail, "" if ok else fix)
        )

    if not ep.is_local:
        try:
            tr._connect()  # noqa: SLF001 - doctor wants the login error by itself
            add("ssh login + host key", True, f"logged in to {tr.where} ({tr.spec.key_name}), host key known")
        except AdapterctlError as exc:
            add("ssh login + host key", False, exc.message, exc.hint or "")
            return checks
    try:
        py = tr.run(["python3", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], timeout=30)
        ver = tuple(int(x) for x in py.stdout.strip().split(".")) if py.ok else None
        add(
            "python3",
            bool(ver and ver >= (3, 8)),
            f"python3 {py.stdout.strip()}" if py.ok else "python3 not found",
            "install python3 >= 3.8 (macOS: xcode-select --install; Debian: apt install python3)",
        )
    except AdapterctlError as exc:
        add("python3", False, exc.message, "install python3 >= 3.8")
    if not ep.is_local:
        rs = tr.run(["rsync", "--version"], timeout=30)
        add(
            "rsync (endpoint)",
            rs.ok,
            rs.stdout.splitlines()[0] if rs.ok and rs.stdout else "rsync not found",
            "install rsync on the endpoint (apt install rsync / brew install rsync)",
        )
        local = shutil.which("rsync")
        add(
            "rsync (this machine)",
            bool(local),
            local or "rsync not found",
            "install rsync here (apt install rsync)",
        )
    tools = tr.run(
        ["sh", "-c", "for t in python3 sha256sum shasum; do command -v $t >/dev/null && echo $t; done"],
        timeout=30,
    )
    found = tools.stdout.split()
    best = (
        "python3 hashlib"
        if "python3" in found
        else ("sha256sum" if "sha256sum" in found else "shasum -a 256" if "shasum" in found else None)
    )
    add(
        "sha256 tool",
        best == "python3 hashlib",
        f"hashes computed there with {best or 'nothing'} (available: {', '.join(found) or 'none'})",
        "install python3: adapterctl verifies hashes with the endpoint's python3 hashlib",
    )
    try:
        models = [m for m in cfg.models if ep.serves(m)]
        facts = gather(ep, tr, models)
    except AdapterctlError as exc:
        add("adapter_dir", False, exc.message, exc.hint or "")
        return checks
    if facts.problem:
        add("adapter_dir", False, facts.problem, "move that file aside, or choose another adapter_dir")
        return checks
    where = ep.adapter_dir if facts.adapter_dir_exists else f"{ep.adapter_dir} (created on first deploy)"
    add(
        "adapter_dir writable",
        facts.writable,
        where,
        f"let the SSH user write {ep.adapter_dir} (or its parent): chown/chmod it on the endpoint",
    )
    need = _need_bytes(cfg, manifest, ep)
    add(
        "free disk",
        facts.free_bytes >= need,
        f"{human_bytes(facts.free_bytes)} free, a deploy of the newest versions needs {human_bytes(need)}",
        "free space on the endpoint or lower keep_releases",
    )
    if ep.reload_method == "sigusr1":
        pid = {"pid": facts.pid.pid, "alive": facts.pid.alive, "error": facts.pid.error} if facts.pid else {}
        loaded = facts.loaded
        detail = f"pid {pid.get('pid')} running" if pid.get("alive") else (pid.get("error") or "no pid")
        if loaded:
            detail += f"; it reports {loaded.get('version_id') or 'no adapter'} loaded"
        add(
            "serving process",
            bool(pid.get("alive")),
            detail,
            f"start the service so it writes {ep.pidfile} (reload_method sigusr1 signals that pid)",
        )
        if pid.get("alive") and loaded is None:
            add(
                "reload confirmation",
                None,
                f"no {loaded_file(ep.pidfile)}: reloads cannot be confirmed",
                "use adapterctl.serving.AdapterReloader in the service (it writes loaded.json)",
            )
    elif ep.reload_method == "restart":
        manager = "launchctl" if facts.platform == "darwin" else "systemctl"
        found = tr.run(["sh", "-c", f"command -v {manager}"], timeout=30)
        add(
            "service manager",
            found.ok,
            f"{manager} {'found' if found.ok else 'not found'} for unit {ep.unit}",
            f"reload_method restart needs {manager} on the endpoint, or use sigusr1 with a pidfile",
        )
        if not ep.allow_outage:
            add(
                "outage consent",
                None,
                "restart reloads mean a 10–20 s outage: deploys need --allow-outage",
                "set allow_outage: true for this endpoint if that outage is acceptable",
            )
    lock = facts.lock
    if lock:
        path = f"{ep.adapter_dir}/.adapterctl.lock"
        add(
            "lock",
            None if lock.state == "held" else False,
            lock.describe(path),
            "wait for that command, or break the lock with --break-lock"
            if lock.state == "held"
            else "no command holds a valid lock there: rerun with --break-lock",
        )
    if facts.journal:
        from adapterctl.journal import state_of

        state = state_of(facts.journal, facts.models.get(facts.journal.begin.get("model")))
        add(
            "unfinished transaction",
            None,
            state.text,
            "the next deploy or rollback of this endpoint finishes it",
        )
    if facts.status_error:
        add("status.json", False, facts.status_error, "repair or move status.json aside")
    keep = [facts.journal.begin.get("version")] if facts.journal else []
    left = tr.call("leftovers", adapter_dir=ep.adapter_dir, models=models, keep=keep)
    if left:
        total = sum(x["bytes"] for x in left)
        add(
            "leftovers",
            None,
            f"{len(left)} temp paths of interrupted commands, {human_bytes(total)}: "
            + "; ".join(f"{x['path']} ({human_bytes(x['bytes'])})" for x in left[:5]),
            "`adapterctl gc` removes them (a rerun of the same deploy reuses its staging instead)",
        )
    return checks


def convert_checks(cfg: Config, eps: list[str]) -> list[Check]:
    """What the convert phase needs on this machine for each (endpoint, model), by package metadata
    (nothing heavy is imported): base_dir, the extras, llama.cpp's converter scripts."""
    from adapterctl.convert import ConversionError, dist_version, spec_for

    checks: list[Check] = []
    seen: set[tuple] = set()
    for name in eps:
        ep = cfg.endpoints[name]
        for m in (m for m in cfg.models.values() if ep.serves(m.name)):
            spec = spec_for(m, ep)
            if spec.passthrough or (m.name, spec) in seen:
                continue
            seen.add((m.name, spec))
            what = f"convert {m.name}: {spec.label}"
            problems: list[tuple[str, str]] = []
            if m.base_dir is None or not m.base_dir.is_dir():
                problems.append(
                    (
                        f"base_dir {m.base_dir or '(not set)'} is not a directory",
                        f"set models.{m.name}.base_dir to the base model (Hugging Face layout) here",
                    )
                )
            needs = (
                ["torch", "transformers", "peft"]
                if spec.format in ("merged", "lora") or spec.fidelity
                else []
            )
            if spec.format in ("merged", "lora"):
                needs.append("llama_cpp_python")
            if spec.fidelity and spec.kind == "mlx":
                needs.append("mlx-lm")
            missing = [n for n in needs if dist_version(n) is None]
            if missing:
                extra = (
                    "gguf" if "llama_cpp_python" in missing else "mlx" if "mlx-lm" in missing else "convert"
                )
                problems.append(
                    (
                        f"not installed here: {', '.join(missing)}",
                        f"pip install -e '.[{extra}]'"
                        + (" and run scripts/build-llama-cpp-wheel" if extra == "gguf" else "")
                        + ("" if spec.fidelity is False else " (or set fidelity: false)"),
                    )
                )
            if spec.format in ("merged", "lora") and "llama_cpp_python" not in missing:
                from adapterctl.convert import gguf

                try:
                    gguf.tools_dir()
                except ConversionError as exc:
                    problems.append((exc.message, exc.hint or ""))
            if problems:
                for detail, fix in problems:
                    checks.append(Check(name, what, "FAIL", detail, fix))
            else:
                checks.append(
                    Check(name, what, "ok", f"base {m.base_dir}; {', '.join(needs) or 'numpy only'}")
                )
    return checks


def local_checks(cfg: Config) -> list[Check]:
    """This machine: leftovers of interrupted commands (store temp copies, scratch dirs, SSH control dirs)."""
    from adapterctl.hygiene import local_leftovers

    left = local_leftovers(cfg.store)
    if not left:
        return [Check("local", "leftovers", "ok", "no temp paths of interrupted commands", "")]
    total = sum(x.bytes for x in left)
    shown = "; ".join(f"{x.path} ({human_bytes(x.bytes)})" for x in left[:5])
    return [
        Check("local", "leftovers", "warn", f"{len(left)}, {human_bytes(total)}: {shown}", "`adapterctl gc`")
    ]


def doctor(cfg: Config, endpoints: list[str], ssh: Any = None) -> list[Check]:
    """All checks for the selected endpoints (in parallel), in endpoint order."""
    from concurrent.futures import ThreadPoolExecutor

    from adapterctl.api import Session, select_endpoints

    eps = select_endpoints(cfg, endpoints or ["all"])
    manifest = Manifest.load(cfg.store)
    session = Session.open(cfg, eps, ssh)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = pool.map(
                lambda n: check_endpoint(cfg, cfg.endpoints[n], session.transports[n], manifest), eps
            )
            return [c for group in results for c in group] + convert_checks(cfg, eps) + local_checks(cfg)
    finally:
        session.close()
