"""Serving-side reload helper: what runs inside the inference process on an endpoint (DESIGN §3, §5).

adapterctl activates a release by swapping `{adapter_dir}/{model}/active` and sending SIGUSR1
to the pid in a pidfile. A serving process that uses `AdapterReloader`:

- writes that pidfile and catches SIGUSR1 with a handler that only sets a flag;
- calls `poll()` from its own serving loop, so the model-specific `load` callback always runs
  on the serving thread (MLX is not thread-safe);
- re-resolves `active`, verifies every file of the release against its RELEASE.json, loads it
  and reports what it actually loaded in `loaded.json` next to the pidfile, which is how
  adapterctl confirms identity rather than liveness. A failed reload keeps the adapter that
  was loaded before and says so in `loaded.json` (`"ok": false`).

`active` absent means "no adapter": `load(None)` serves the base model (DESIGN §7 `base`).

Run as a stand-in serving process (used by tests and `adapterctl demo`):

    python -m adapterctl.serving --adapter-dir DIR --model NAME --pidfile FILE [--log FILE]

Only the standard library is imported at module level: this module loads inside serving
processes and must stay fast to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterctl.endpoint_ops import atomic_write_bytes as write_atomic
from adapterctl.endpoint_ops import sha256_file
from adapterctl.errors import AdapterctlError

RELEASE_FILE = "RELEASE.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MLX_WEIGHTS_FILE = "adapters.safetensors"  # a release converted for mlx_lm (adapterctl.mlxformat)
LOADED_FILE = "loaded.json"
RELEASE_SCHEMA = 1

Loader = Callable[[dict | None], None]
Clock = Callable[[], datetime]


class ReloadError(AdapterctlError):
    """The active release cannot be resolved, verified or loaded; the old adapter stays loaded."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso_z(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_release(release: Path) -> dict:
    try:
        raw = (release / RELEASE_FILE).read_bytes()
    except FileNotFoundError:
        raise ReloadError(
            f"{release}: no {RELEASE_FILE}",
            "releases must be created by adapterctl (transfer writes RELEASE.json)",
        ) from None
    except OSError as exc:
        raise ReloadError(f"{release / RELEASE_FILE}: cannot read: {exc}") from exc
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReloadError(f"{release / RELEASE_FILE}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ReloadError(f"{release / RELEASE_FILE}: expected a JSON object")
    return meta


def resolve_active(adapter_dir: str | Path, model: str) -> dict | None:
    """Resolve `{adapter_dir}/{model}/active` and verify the release it points to.

    Returns `{"version_id", "sha256", "path"}` (path: the resolved release directory), or None
    when `active` does not exist (serve the base model). Every file listed in RELEASE.json is
    re-hashed and compared. Raises ReloadError on a dangling link, a missing or malformed
    RELEASE.json, a model mismatch, a missing file or a hash mismatch.
    """
    active = Path(adapter_dir) / model / "active"
    if not os.path.lexists(active):
        return None
    # Resolve once: everything below reads this one directory even if `active` moves meanwhile.
    release = Path(os.path.realpath(active))
    if not release.is_dir():
        raise ReloadError(f"{active} points to {release}, which is not a directory")
    meta = _read_release(release)
    where = release / RELEASE_FILE
    if meta.get("schema") != RELEASE_SCHEMA:
        raise ReloadError(f"{where}: unsupported schema {meta.get('schema')!r} (expected {RELEASE_SCHEMA})")
    if meta.get("model") != model:
        raise ReloadError(f"{where}: release is for model {meta.get('model')!r}, not {model!r}")
    version_id = meta.get("version_id")
    if not isinstance(version_id, str) or not version_id:
        raise ReloadError(f"{where}: missing version_id")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise ReloadError(f"{where}: 'files' must list the release's files with their sha256")
    # the version's identity is the sha256 of its PEFT weights (the manifest's), also for a release
    # that holds a converted artifact (an MLX adapter, a GGUF) instead of the PEFT files
    sha = meta.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ReloadError(f"{where}: missing the version's sha256")
    if WEIGHTS_FILE in files and sha != files[WEIGHTS_FILE]:
        raise ReloadError(f"{where}: sha256 does not match files[{WEIGHTS_FILE!r}]")
    for name, expected in files.items():
        # Names come from a file on disk; never let one read outside the release.
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ReloadError(f"{where}: invalid file name {name!r}")
        try:
            actual = sha256_file(release / name)
        except FileNotFoundError:
            raise ReloadError(f"{release}: {name} is listed in {RELEASE_FILE} but missing") from None
        except OSError as exc:
            raise ReloadError(f"{release / name}: cannot read: {exc}") from exc
        if actual != expected:
            raise ReloadError(
                f"{release / name}: sha256 mismatch (RELEASE.json {str(expected)[:12]}…, "
                f"on disk {actual[:12]}…)",
                "the release was modified after transfer; redeploy it",
            )
    return {
        "version_id": version_id,
        "sha256": sha,
        "path": str(release),
        "format": meta.get("format") or "peft",
    }


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


class AdapterReloader:
    """Reloads `{adapter_dir}/{model}/active` into a serving process when it gets SIGUSR1.

    `load(info)` is the model-specific loader: it gets the `resolve_active` result (None =
    base model) and raises if it cannot load, leaving the previous adapter in place; it always
    runs on the thread that calls `poll()` / `reload_now()`. The report goes to `loaded_file`
    (default: `loaded.json` next to the pidfile).
    """

    def __init__(
        self,
        adapter_dir: str | Path,
        model: str,
        pidfile: str | Path,
        load: Loader,
        *,
        loaded_file: str | Path | None = None,
        clock: Clock = _utc_now,
    ):
        self.adapter_dir = Path(adapter_dir)
        self.model = model
        self.pidfile = Path(pidfile)
        self.loaded_file = Path(loaded_file) if loaded_file else self.pidfile.with_name(LOADED_FILE)
        self._load = load
        self._clock = clock
        self._pid = os.getpid()
        # A plain bool: the only thing safe to touch from a signal handler without locks.
        self._pending = False
        self._current: dict | None = None
        self._loaded_at: str | None = None
        self._seq = 0
        self._previous_handler: Any = None
        self._installed = False

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> None:
        """Install the SIGUSR1 handler, then write our pid to the pidfile (atomically).

        Must be called from the main thread (a Python rule for signal handlers). An existing
        pidfile is replaced. Raises ValueError off the main thread, OSError if the pidfile
        cannot be written.
        """
        # Handler first: SIGUSR1's default action kills the process, and the pidfile invites it.
        self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)
        self._installed = True
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.pidfile, f"{self._pid}\n".encode("ascii"))

    def uninstall(self) -> None:
        """Restore the previous SIGUSR1 handler and remove the pidfile if it still holds our pid."""
        if self._installed:
            signal.signal(signal.SIGUSR1, self._previous_handler or signal.SIG_DFL)
            self._installed = False
        if _read_pid(self.pidfile) == self._pid:
            with contextlib.suppress(FileNotFoundError):
                self.pidfile.unlink()

    def __enter__(self) -> AdapterReloader:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending = True

    # -- reloading -------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True when a SIGUSR1 arrived and `poll()` has not handled it yet."""
        return self._pending

    @property
    def current(self) -> dict | None:
        """What is loaded now: `{"version_id", "sha256", "path"}`, or None for the base model."""
        return dict(self._current) if self._current else None

    def session_metadata(self) -> dict:
        """`{model: version_id}` of what is loaded now (None = base), for the service's session log."""
        return {self.model: self._current["version_id"] if self._current else None}

    def poll(self) -> dict | None:
        """Reload if SIGUSR1 arrived since the last call; return the loaded.json record, else None.

        Call from the serving loop. Never raises for a failed reload (see `reload_now`).
        """
        if not self._pending:
            return None
        # Clear before resolving: a signal arriving during the reload triggers one more.
        self._pending = False
        return self.reload_now()

    def reload_now(self) -> dict:
        """Resolve, verify and load the active release now; write and return the loaded.json record.

        On failure the previously loaded adapter stays loaded and the record has `"ok": false`
        plus `"error"`. Loader exceptions are caught (Exception only). Raises OSError only if
        loaded.json itself cannot be written.
        """
        attempted = self._clock()
        try:
            info = resolve_active(self.adapter_dir, self.model)
            self._load(info)
        except Exception as exc:
            error = str(exc) if isinstance(exc, ReloadError) else f"{type(exc).__name__}: {exc}"
            record = self._record(ok=False, attempted=attempted)
            record["error"] = error
        else:
            self._current = info
            self._loaded_at = _iso_z(self._clock())
            record = self._record(ok=True, attempted=attempted)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        # loaded.json: the latest report; loaded.<model>.json: this model's, for a process serving several
        write_atomic(self.loaded_file.with_name(f"loaded.{self.model}.json"), data)
        write_atomic(self.loaded_file, data)  # last: this is the file most readers wait on
        return record

    def _record(self, *, ok: bool, attempted: datetime) -> dict:
        self._seq += 1
        current = self._current or {}
        return {
            "model": self.model,
            "version_id": current.get("version_id"),
            "sha256": current.get("sha256"),
            "path": current.get("path"),
            "pid": self._pid,
            "loaded_at": self._loaded_at,
            "attempted_at": _iso_z(attempted),
            # Increases with every attempt, so a reader can tell a fresh report from a stale one.
            "seq": self._seq,
            "ok": ok,
        }


# -- the stand-in serving process ---------------------------------------------------------
class _EventLog:
    """One line per event, each emitted with a single write(2) so concurrent appends never interleave."""

    def __init__(self, path: str | None):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else 2
        self._owned = path is not None

    def __call__(self, event: str, **fields: Any) -> None:
        parts = [_iso_z(_utc_now()), f"pid={os.getpid()}", event]
        parts += [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in fields.items()]
        # A full disk must not take the serving loop down.
        with contextlib.suppress(OSError):
            os.write(self._fd, (" ".join(parts) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)


def _check_safetensors(info: dict | None) -> None:
    """Stand-in loader: prove the weights are a readable safetensors file with LoRA tensors (PEFT's
    lora_A/lora_B, or an MLX adapter's lora_a/lora_b)."""
    if info is None:
        return  # base model: nothing to load
    from safetensors.numpy import load_file

    name = MLX_WEIGHTS_FILE if info.get("format") == "adapter" else WEIGHTS_FILE
    tensors = load_file(str(Path(info["path"]) / name))
    if not any(part in key for key in tensors for part in (".lora_A.", ".lora_B.", ".lora_a", ".lora_b")):
        raise ReloadError(f"{info['path']}/{name}: no LoRA tensors")


def _report(log: _EventLog, record: dict) -> None:
    if record["ok"]:
        log("reload-ok", version_id=record["version_id"], sha256=record["sha256"], seq=record["seq"])
    else:
        log("reload-failed", error=record["error"], still_loaded=record["version_id"], seq=record["seq"])


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in serving loop until SIGTERM/SIGINT; return the exit code."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m adapterctl.serving",
        description="Stand-in serving process: reloads {adapter-dir}/{model}/active on SIGUSR1.",
    )
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--log", help="append event lines here (default: stderr)")
    parser.add_argument("--interval", type=float, default=0.05, help="poll interval in seconds")
    args = parser.parse_args(argv)

    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    try:
        log = _EventLog(args.log)
    except OSError as exc:
        print(f"serving: cannot open log {args.log}: {exc}", file=sys.stderr)
        return 2
    reloader = AdapterReloader(args.adapter_dir, args.model, Path(args.pidfile), _check_safetensors)
    try:
        try:
            reloader.install()
        except OSError as exc:
            log("start-failed", error=f"cannot write pidfile {args.pidfile}: {exc}")
            return 1
        log("start", model=args.model, adapter_dir=args.adapter_dir, pidfile=args.pidfile)
        first = True
        while not stop:
            try:
                record = reloader.reload_now() if first else reloader.poll()
            except OSError as exc:
                # The model did (or did not) reload; only the report failed. Keep serving.
                log("report-failed", file=str(reloader.loaded_file), error=str(exc))
            else:
                if record is not None:
                    _report(log, record)
            first = False
            time.sleep(args.interval)
        log("stop", version_id=reloader.session_metadata()[args.model])
        return 0
    finally:
        reloader.uninstall()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
