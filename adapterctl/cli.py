"""The command line: parse, call adapterctl.api, print. stdout is data, stderr is progress."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from adapterctl import __version__
from adapterctl.errors import EXIT_CODES_DOC, EXIT_USAGE, AdapterctlError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_EXIT_HELP = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES_DOC.items()) + "."
app = typer.Typer(
    help="Deploy LoRA adapters from the training box to inference endpoints: versioned, health-checked, "
    "atomic, reversible.\n\n" + _EXIT_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"config": None, "debug": False, "ssh_config": None, "accept_new": False}

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="adapterctl.yaml to use (else $ADAPTERCTL_CONFIG, ./adapterctl.yaml "
        "or a parent's, ~/.config/adapterctl/adapterctl.yaml).",
        show_default=False,
    ),
]
EndpointsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--endpoints",
        "-e",
        help="Endpoint names: repeat the flag or list them (`-e a b`, `-e a,b`); `all` for every endpoint.",
        show_default=False,
    ),
]
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option("--models", "-m", help="Model names: repeat the flag or list them.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and change nothing.")]
BreakLockOpt = Annotated[
    bool, typer.Option("--break-lock", help="Break an endpoint lock older than lock_stale_after_s.")
]
ParallelOpt = Annotated[int, typer.Option(help="Endpoints worked on at once.")]
AllowOutageOpt = Annotated[
    bool,
    typer.Option(
        "--allow-outage",
        help="Consent to reload_method restart: the service is down 10–20 s while it restarts.",
    ),
]


@app.callback()
def _global(
    config: ConfigOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show stack traces on errors.")] = False,
    ssh_config: Annotated[
        Path | None,
        typer.Option(
            "--ssh-config",
            help="ssh_config file for SSH endpoints (default ~/.ssh/config).",
            show_default=False,
        ),
    ] = None,
    accept_new_host_keys: Annotated[
        bool,
        typer.Option(
            "--accept-new-host-keys",
            help="Trust and record host keys not yet in known_hosts (a changed key is always refused).",
        ),
    ] = False,
) -> None:
    _state.update(config=config, debug=debug, ssh_config=ssh_config, accept_new=accept_new_host_keys)


def _ssh():
    from adapterctl.transports.ssh import SSHOptions

    return SSHOptions(ssh_config=_state["ssh_config"], accept_new_host_keys=_state["accept_new"])


def _config():
    from adapterctl.config import find_config, load_config

    return load_config(find_config(_state["config"], os.environ, Path.cwd(), Path.home()))


def _refuse(message: str, hint: str | None = None) -> None:
    from adapterctl.errors import UsageError

    raise UsageError(message, hint)


def _known_endpoint(cfg, name: str, rows: list[dict]) -> None:
    """`name` is a configured endpoint or one the log mentions; else UsageError with a did-you-mean."""
    logged = {r.get("endpoint") for r in rows} - {None, ""}
    if name not in cfg.endpoints and name not in logged:
        cfg.endpoint(name)  # raises, naming the known endpoints


def _names(cfg, models: list[str] | None = None, endpoints: list[str] | None = None) -> None:
    """Unknown model and endpoint names, refused with a did-you-mean before the pipeline is imported."""
    for name in _split(models):
        _run(cfg.model, name)
    for name in _split(endpoints):
        if name != "all":
            _run(cfg.endpoint, name)


def _split(values: list[str] | None) -> list[str]:
    from adapterctl.config import split_names

    return split_names(values)


# -- rendering (adapterctl.report) ---------------------------------------------------------------
def render_plan(plan, console: Console, dry_run: bool) -> None:
    from adapterctl.report import render_plan as render

    render(plan, console, dry_run)


def _add_row(table: Table, *cells: Any) -> None:
    from adapterctl.report import add_row

    add_row(table, *cells)


def _short(text: str | None, width: int = 80) -> str:
    from adapterctl.report import _short as short

    return short(text, width)


def _print_report(report, as_json: bool) -> None:
    from adapterctl.report import print_report

    print_report(report, as_json, out)


def _run(fn, *args, **kwargs) -> Any:
    """Call an api function; map errors to one line on stderr and a documented exit code."""
    try:
        return fn(*args, **kwargs)
    except AdapterctlError as exc:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"  → {exc.hint}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: active links were never left half-swapped; rerun the command to finish")
        raise typer.Exit(130) from None


def _progress(line: str) -> None:
    err.print(line, markup=False)


class ProgressBoard:
    """Live per-endpoint bars on a terminal (phase, bytes sent); plain lines everywhere else."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def start(self, plan) -> None:
        for name in plan.endpoints:
            total = sum(s.bytes for s in plan.steps if s.endpoint == name)
            self.tasks[name] = self.bars.add_task(f"{name}: waiting", total=max(total, 1))
        self.bars.start()

    def phase(self, endpoint: str, text: str) -> None:
        if endpoint in self.tasks:
            self.bars.update(self.tasks[endpoint], description=f"{endpoint}: {text}")

    def advance(self, endpoint: str, nbytes: int) -> None:
        if endpoint in self.tasks:
            self.bars.advance(self.tasks[endpoint], nbytes)

    def stop(self) -> None:
        self.bars.stop()


def _board() -> ProgressBoard | None:
    return ProgressBoard() if err.is_terminal else None


# -- commands ------------------------------------------------------------------------------------
@app.command()
def deploy(
    cycle: Annotated[
        int | None,
        typer.Option(
            help="Training cycle N: register the newest adapter of each "
            "model as cycle{N}_{date}_{sha8} and deploy it."
        ),
    ] = None,
    models: ModelsOpt = None,
    all_adapters: Annotated[bool, typer.Option("--all-adapters", help="Every model in the config.")] = False,
    endpoints: EndpointsOpt = None,
    version: Annotated[
        str | None, typer.Option(help="Deploy this registered version id instead of --cycle.")
    ] = None,
    dry_run: DryRunOpt = False,
    break_lock: BreakLockOpt = False,
    parallel: ParallelOpt = 4,
    canary: Annotated[
        str | None,
        typer.Option(
            help="Deploy to this endpoint first, through verify; touch the others only if it succeeds."
        ),
    ] = None,
    allow_outage: AllowOutageOpt = False,
    health_local: Annotated[
        bool,
        typer.Option(
            "--health-local",
            help="Run the pre-activation health check on this machine (same engine, the stored artifact) "
            "instead of on the endpoint; verify still checks the live endpoint.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Version, transfer, health-check, activate and verify adapters on endpoints; roll back on failure.

    Exit codes: 0 deployed (or already active); 1 a phase failed; 2 usage/config/adapter error, nothing
    written; 3 endpoint locked; 4 health check failed before activation, active untouched; 5 verify
    failed after activation, rolled back. With several endpoints the worst outcome decides.
    """
    from adapterctl.config import check_deploy_options

    _run(check_deploy_options, cycle, version, parallel, all_adapters, _split(models))
    cfg = _run(_config)  # argument and config errors print before the pipeline is imported
    _names(cfg, models, endpoints)
    from adapterctl import api

    chosen = list(cfg.models) if all_adapters else _split(models)
    board = None if as_json else _board()

    def on_plan(plan) -> None:
        render_plan(plan, err, False)
        if board is not None:
            board.start(plan)

    try:
        opts = api.RunOptions(
            dry_run=dry_run,
            break_lock=break_lock,
            parallel=parallel,
            ssh=_ssh(),
            progress=_progress,
            on_plan=on_plan,
            board=board,
            command=" ".join(sys.argv),
            allow_outage=allow_outage,
            health_local=health_local,
        )
        report = _run(
            api.deploy,
            cfg,
            models=chosen,
            endpoints=_split(endpoints),
            cycle=cycle,
            version=version,
            canary=canary,
            opts=opts,
        )
    finally:
        if board is not None:
            board.stop()
    _print_report(report, as_json)
    raise typer.Exit(report.exit_code)


@app.command()
def convert(
    models: ModelsOpt = None,
    all_adapters: Annotated[bool, typer.Option("--all-adapters", help="Every model in the config.")] = False,
    endpoints: Annotated[
        list[str] | None,
        typer.Option(
            "--endpoints",
            "-e",
            help="Convert for these endpoints' kinds and settings (default: every endpoint).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Convert this registered version (default: each model's newest).")
    ] = None,
    dry_run: DryRunOpt = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Instead of converting: remove cache entries not used by the newest keep_releases "
            "versions of each model (they are rebuilt if ever needed again).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the convert phase alone: build (or verify in the cache) what each endpoint kind loads.

    mlx endpoints get an mlx_lm adapter (or a fused model); gguf endpoints a merged GGUF quantized
    to Q4_K_M (or the configured type) or a GGUF LoRA; `convert: peft` ships the PEFT files as they
    are. Every conversion is checked against the PEFT original on the model's health suite and
    cached under the store's .cache/convert/ by content key; a deploy reuses it. Touches no endpoint.
    """
    from adapterctl.config import check_deploy_options

    _run(check_deploy_options, None, None, 1, all_adapters, _split(models))
    cfg = _run(_config)
    _names(cfg, models, endpoints)
    from adapterctl import api

    if prune:
        from adapterctl.plan import human_bytes

        removed, kept = _run(api.prune_conversions, cfg, dry_run)
        if as_json:
            out.print_json(json.dumps({"removed": dict(removed), "kept": kept, "dry_run": dry_run}))
        else:
            verb = "would remove" if dry_run else "removed"
            for name, size in removed:
                out.print(f"{verb} {name} ({human_bytes(size)})", markup=False)
            total = human_bytes(sum(size for _, size in removed))
            out.print(f"{verb} {len(removed)} cache entries ({total}); kept {len(kept)} in use", markup=False)
        raise typer.Exit(0)
    chosen = list(cfg.models) if all_adapters else _split(models)
    if not chosen:
        chosen = list(cfg.models)
    opts = api.RunOptions(
        dry_run=dry_run, progress=_progress, on_plan=lambda plan: render_plan(plan, err, False)
    )
    report = _run(
        api.convert_versions, cfg, models=chosen, endpoints=_split(endpoints), version=version, opts=opts
    )
    _print_report(report, as_json)
    raise typer.Exit(report.exit_code)


@app.command()
def rollback(
    endpoints: EndpointsOpt = None,
    models: ModelsOpt = None,
    to: Annotated[
        str, typer.Option("--to", help="previous | last-good | base (no adapter) | VERSION_ID")
    ] = "previous",
    dry_run: DryRunOpt = False,
    break_lock: BreakLockOpt = False,
    parallel: ParallelOpt = 4,
    allow_outage: AllowOutageOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Point `active` back at an earlier release and reload the service (run it twice to undo it).

    Exit codes: 0 rolled back; 1 a step failed (e.g. the service did not reload, or the release
    fails its health check: the rollback stands); 2 nothing to roll back to, or bad input; 3 locked.
    """
    from adapterctl.config import check_parallel, check_rollback_target

    _run(check_parallel, parallel)
    _run(check_rollback_target, to)
    cfg = _run(_config)
    _names(cfg, models, endpoints)
    from adapterctl import api

    opts = api.RunOptions(
        dry_run=dry_run,
        break_lock=break_lock,
        parallel=parallel,
        ssh=_ssh(),
        progress=_progress,
        on_plan=lambda plan: render_plan(plan, err, False),
        command=" ".join(sys.argv),
        allow_outage=allow_outage,
    )
    report = _run(api.rollback, cfg, endpoints=_split(endpoints), models=_split(models), to=to, opts=opts)
    _print_report(report, as_json)
    raise typer.Exit(report.exit_code)


@app.command()
def status(endpoints: EndpointsOpt = None, as_json: JsonOpt = False) -> None:
    """What each endpoint runs now: active/previous releases, health, drift from status.json."""
    cfg = _run(_config)
    _names(cfg, endpoints=endpoints)
    from adapterctl import api

    rows = _run(api.status, cfg, _split(endpoints), _ssh())
    unreachable = [r for r in rows if r.get("error")]
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        raise typer.Exit(1 if unreachable else 0)
    table = Table(title="endpoint status")
    for col in (
        "endpoint",
        "model",
        "kind",
        "active",
        "format",
        "previous",
        "health",
        "last good",
        "releases",
        "drift",
    ):
        table.add_column(col, overflow="fold")
    pending = [r for r in rows if r.get("pending") or r.get("lock_problem")]
    for r in rows:
        if r.get("error"):
            _add_row(table, r["endpoint"], "-", r["kind"], "", "", "", "unreachable", "", "", "see below")
            continue
        _add_row(
            table,
            r["endpoint"],
            r["model"],
            r["kind"],
            r["active"] or "-",
            r["active_format"] or "-",
            r["previous"] or "-",
            r["health_status"] or "-",
            r["last_good_version"] or "-",
            str(len(r["releases"])),
            "; ".join(r["drift"]) or "",
        )
    out.print(table)
    for r in pending:
        for line in (r.get("pending"), r.get("lock_problem")):
            if line:
                out.print(f"{r['endpoint']}/{r['model']}: {line}", markup=False)
    for r in unreachable:
        err.print(f"{r['endpoint']}: {r['error']}", markup=False)
    raise typer.Exit(1 if unreachable else 0)


@app.command()
def doctor(endpoints: EndpointsOpt = None, as_json: JsonOpt = False) -> None:
    """Check each endpoint can take a deploy (login, host key, python3, rsync, disk, service); say the fix."""
    from dataclasses import asdict

    cfg = _run(_config)
    _names(cfg, endpoints=endpoints)
    from adapterctl.doctor import doctor as run_doctor

    checks = _run(run_doctor, cfg, _split(endpoints), _ssh())
    if as_json:
        out.print_json(json.dumps([asdict(c) for c in checks]))
    else:
        table = Table(title="adapterctl doctor")
        for col in ("endpoint", "check", "result", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in checks:
            _add_row(table, c.endpoint, c.name, c.result, c.detail, c.fix)
        out.print(table)
    raise typer.Exit(1 if any(c.result == "FAIL" for c in checks) else 0)


@app.command()
def gc(
    endpoints: EndpointsOpt = None,
    dry_run: DryRunOpt = False,
    break_lock: BreakLockOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove what interrupted commands left behind, here and on endpoints (default: every endpoint).

    Here: store copies and conversion scratch dirs of runs that are gone, stale SSH control dirs. On each
    endpoint, under its lock: staging dirs that no open transaction will reuse (a rerun of an interrupted
    deploy resumes from its own, which is kept), temp links and files of interrupted writes.
    `adapterctl doctor` lists the same leftovers without removing them.
    """
    from dataclasses import asdict

    cfg = _run(_config)
    _names(cfg, endpoints=endpoints)
    from adapterctl import api
    from adapterctl.steps import human_bytes

    opts = api.RunOptions(break_lock=break_lock, progress=_progress, command=" ".join(sys.argv))
    items, errors = _run(api.gc, cfg, _split(endpoints), _ssh(), dry_run, opts)
    if as_json:
        out.print_json(
            json.dumps({"dry_run": dry_run, "removed": [asdict(i) for i in items], "errors": dict(errors)})
        )
    else:
        verb = "would remove" if dry_run else "removed"
        table = Table(title=f"adapterctl gc ({verb})")
        for col in ("where", "path", "size", "what"):
            table.add_column(col, overflow="fold")
        for i in items:
            _add_row(table, i.where, i.path, human_bytes(i.bytes), i.what)
        out.print(table)
        out.print(f"{verb} {len(items)} leftovers, {human_bytes(sum(i.bytes for i in items))}", markup=False)
    for name, why in errors:
        err.print(f"{name}: {why}", markup=False)
    raise typer.Exit(1 if errors else 0)


@app.command()
def versions(models: ModelsOpt = None, as_json: JsonOpt = False) -> None:
    """Registered adapter versions in the manifest, oldest first."""
    from adapterctl.manifest import Manifest

    cfg = _run(_config)
    manifest = _run(Manifest.load, cfg.store)
    chosen = _split(models) or sorted(manifest.data["versions"])
    rows = [dict(v, model=m) for m in chosen for v in manifest.versions(m)]
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"versions in {manifest.path}")
    for col in ("model", "version", "created", "size", "dtype", "features", "final_loss", "source"):
        table.add_column(col, overflow="fold")
    for v in rows:
        metrics = v.get("training_metrics")
        loss = metrics.get("final_loss") if isinstance(metrics, dict) else None
        _add_row(
            table,
            v["model"],
            v["version_id"],
            v["created"],
            f"{v['size_bytes']:,}",
            v.get("dtype", "?"),
            _features_text(v.get("features")),
            "-" if loss is None else str(loss),
            v["provenance"]["source_path"],
        )
    out.print(table)


def _features_text(features: Any) -> str:
    """PEFT features beyond plain LoRA, e.g. "dora, bias=all" ("lora": none; "?": not recorded)."""
    if not isinstance(features, dict):
        return "?"
    words = [name for key, name in (("use_dora", "dora"), ("use_rslora", "rslora")) if features.get(key)]
    if features.get("modules_to_save"):
        words.append("modules_to_save=" + ",".join(map(str, features["modules_to_save"])))
    if features.get("bias", "none") != "none":
        words.append(f"bias={features['bias']}")
    words += [
        f"{key}({len(features[key])})" for key in ("rank_pattern", "alpha_pattern") if features.get(key)
    ]
    return ", ".join(words) or "lora"


@app.command()
def register(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name from the config.")],
    cycle: Annotated[int, typer.Option(help="Training cycle number N for the id cycle{N}_{date}_{sha8}.")],
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Adapter directory (default: newest under the model's source).", show_default=False
        ),
    ] = None,
) -> None:
    """Validate, hash and store an adapter in the manifest (the version phase alone)."""
    from adapterctl.names import check_cycle

    _run(check_cycle, cycle)
    cfg = _run(_config)
    m = _run(cfg.model, model)
    from adapterctl import api
    from adapterctl.identity import Identity, utc_now
    from adapterctl.versioning import newest_adapter

    src = path or _run(newest_adapter, m.source)
    vid, created = _run(api.register_version, cfg, m.name, src, cycle, utc_now, Identity.current())
    out.print(vid)
    err.print(
        f"registered {m.name} {vid} from {src}" if created else f"{m.name}: already registered as {vid}",
        markup=False,
    )


@app.command("log")
def log_(
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent entries (0 = all).")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent entries of deploy_log.jsonl."""
    if limit < 0:
        _run(_refuse, f"--limit must be 0 (all) or a positive number of entries, got {limit}")
    cfg = _run(_config)
    from adapterctl import api

    rows = _run(api.read_log, cfg, None, 0)
    if endpoint is not None:
        _run(_known_endpoint, cfg, endpoint, rows)
        rows = [r for r in rows if r.get("endpoint") == endpoint]
    rows = rows[-limit:] if limit else rows
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"{cfg.store / 'deploy_log.jsonl'}")
    for col in ("time", "action", "endpoint", "model", "version", "status", "phases", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        _add_row(
            table,
            r.get("timestamp", ""),
            r.get("action", ""),
            r.get("endpoint", "") or "",
            r.get("model") or "",
            r.get("version") or "",
            r.get("status", ""),
            " ".join(r.get("phases_completed") or []),
            _short(r.get("error") or r.get("reason")),
        )
    out.print(table)


@app.command()
def demo(
    directory: Annotated[
        Path | None, typer.Argument(help="Workspace to create (default: a new temp dir).", show_default=False)
    ] = None,
) -> None:
    """Run the whole pipeline on this machine: two local endpoints, real adapters, a live server.

    With the `model` extra installed it uses the real tiny model (built offline, cached); otherwise
    a stand-in translator and server.
    """
    from adapterctl.demo import run_demo

    code = _run(run_demo, directory, out, err)
    raise typer.Exit(code)


@app.command()
def serve(
    model: Annotated[str, typer.Option("--model", help="Model name (its directory under --adapter-dir).")],
    adapter_dir: Annotated[str, typer.Option("--adapter-dir", help="The endpoint's adapter_dir.")],
    pidfile: Annotated[str, typer.Option("--pidfile", help="Pidfile; loaded.json is written next to it.")],
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, see the log).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    backend: Annotated[str, typer.Option("--backend", help="standin | peft")] = "standin",
    base: Annotated[
        str | None, typer.Option("--base", help="Base model directory (backend peft).", show_default=False)
    ] = None,
    log: Annotated[
        str | None, typer.Option("--log", help="Append event lines here (else stderr).", show_default=False)
    ] = None,
) -> None:
    """Run the reference serving process: OpenAI-compatible HTTP API, reloads `active` on SIGUSR1."""
    from adapterctl.serve import main as serve_main

    argv = ["--model", model, "--adapter-dir", adapter_dir, "--pidfile", pidfile, "--port", str(port)]
    argv += ["--host", host, "--backend", backend]
    argv += ["--base", base] if base is not None else []
    argv += ["--log", log] if log is not None else []
    raise typer.Exit(serve_main(argv))


_LIST_COMMANDS = {"deploy", "rollback", "status", "doctor", "versions"}


def app_commands() -> set[str]:
    return {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands}


def _expand_lists(argv: list[str]) -> list[str]:
    """Let `--endpoints a b` mean `--endpoints a --endpoints b` (the original tool's syntax).

    Only for the commands whose --endpoints/--models take lists (not `register -m MODEL PATH`).
    """
    command = next((a for a in argv if a in _LIST_COMMANDS or a in app_commands()), None)
    if command not in _LIST_COMMANDS:
        return argv
    multi = {"--endpoints", "-e", "--models", "-m"}
    result: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        result.append(tok)
        i += 1
        if tok in multi:
            values = []
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            result.append(",".join(values) if values else "")
            if not values:
                result.pop()
    return result


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--version"]:
        print(f"adapterctl {__version__}")
        return
    try:
        app(args=_expand_lists(args), prog_name="adapterctl")
    except SystemExit:
        raise
    except Exception:  # a bug: one line unless --debug
        if "--debug" in args:
            raise
        exc = sys.exc_info()[1]
        err.print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            markup=False,
        )
        sys.exit(EXIT_USAGE if isinstance(exc, ValueError) else 1)
