"""The reference serving process: an OpenAI-compatible HTTP server that hot-reloads adapters.

    adapterctl serve --model M --adapter-dir D --pidfile F --port P [--host 127.0.0.1]
                     [--backend standin|peft] [--base DIR] [--log FILE]

(or `python -m adapterctl.serve ...`). It serves `{adapter_dir}/{model}/active` and reloads it on
SIGUSR1 through `adapterctl.serving.AdapterReloader` (pidfile, verified release, `loaded.json`).

Threading (DESIGN §5, MLX is not thread-safe): ALL model work — load and generate — runs on ONE
serving thread, the main thread, which also receives the signals. HTTP handler threads only parse
requests, put a job on a queue and wait (bounded) for the answer. The serving thread loops
`reloader.poll()` → answer one queued job, so a reload always happens between two requests:
no request fails or sees a half-loaded adapter during a SIGUSR1 reload.

Endpoints:
- `POST /v1/chat/completions`: OpenAI-style answer plus a non-standard `adapter` field
  `{version_id, sha256}` naming the adapter that produced *this* answer (null = base model).
  `model` may be the model name or `{model}@{version_id}`; the latter is refused (404) unless that
  version is the one loaded.
- `GET /health`: `{status, model, adapter: {version_id, sha256, loaded_at} | null, pid,
  last_reload: {ok, error, attempted_at, seq}, backend}`.
- `GET /v1/models`: the model name, and `{model}@{version_id}` while an adapter is loaded.

Backends implement `Backend` (`load(info_or_None)`, `generate(text) -> str`). `standin` reuses
`adapterctl.demo_translator` (all-zero lora_B → echoes English like the base model, else the
phrasebook's Spanish). `peft` runs `adapterctl.tinymodel.Translator(base_dir, release_dir)`, the
real tiny transformer with the release's LoRA merged in (needs adapterctl[model] and --base).

Only the standard library is imported at module level; a backend imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from adapterctl.serving import AdapterReloader, _EventLog, _report

BACKENDS = ("standin", "peft")
MAX_REQUEST_BYTES = 1 << 20
DEFAULT_REQUEST_TIMEOUT_S = 60.0
_IDLE_WAIT_S = 0.05  # longest a SIGUSR1/SIGTERM waits for the serving loop when idle


class ServeError(Exception):
    """The server cannot start (bad backend, port in use, pidfile not writable)."""


# -- backends ---------------------------------------------------------------------------------
class Backend(ABC):
    """The model behind the server. Both methods are only ever called on the serving thread."""

    name = "backend"

    @abstractmethod
    def load(self, info: dict | None) -> None:
        """Load the release `info` (`resolve_active` result) or, for None, the bare base model.

        Raise to refuse it: the previously loaded adapter must then stay in use unchanged.
        """

    @abstractmethod
    def generate(self, text: str) -> str:
        """The model's answer to one user message."""


class StandinBackend(Backend):
    """adapterctl.demo_translator as a server: a no-op adapter (or none) echoes, else phrasebook Spanish."""

    name = "standin"

    def __init__(self) -> None:
        self._noop = True  # no adapter = the base model, which does not translate

    def load(self, info: dict | None) -> None:
        from adapterctl.demo_translator import adapter_is_noop

        # Compute first, assign last: a BadAdapter leaves the old state in place.
        self._noop = True if info is None else adapter_is_noop(info["path"])

    def generate(self, text: str) -> str:
        from adapterctl.demo_translator import translate

        return translate(" ".join(text.splitlines()), self._noop)


class TinyModelBackend(Backend):
    """The real tiny EN→ES transformer of `adapterctl.tinymodel`: base weights + the release's LoRA."""

    name = "peft"

    def __init__(self, base: str, translator_class: Any):
        self.base = base
        self._translator_class = translator_class
        self._model: Any = None

    def load(self, info: dict | None) -> None:
        # Build the new model completely before replacing the old one: a bad adapter changes nothing.
        self._model = self._translator_class(self.base, info["path"] if info else None)

    def generate(self, text: str) -> str:
        return self._model.translate(" ".join(text.splitlines()))


def make_backend(kind: str, base: str | None) -> Backend:
    """Raises ServeError for an unknown backend or one whose dependencies are missing."""
    if kind == "standin":
        return StandinBackend()
    if kind == "peft":
        if not base:
            raise ServeError("backend peft needs --base BASE_DIR (`python -m adapterctl.tinymodel build`)")
        try:
            import numpy  # noqa: F401
            import safetensors  # noqa: F401
            import sentencepiece  # noqa: F401

            from adapterctl import tinymodel
        except ImportError as exc:
            raise ServeError(f"backend peft needs adapterctl[model] ({exc})") from None
        translator = getattr(tinymodel, "Translator", None)
        if translator is None:
            raise ServeError("backend peft needs adapterctl[model]: adapterctl.tinymodel has no Translator")
        if not Path(base, "config.json").is_file():
            raise ServeError(f"backend peft: {base} has no config.json (not a tinymodel base directory)")
        return TinyModelBackend(base, translator)
    raise ServeError(f"unknown backend {kind!r}; valid backends: {', '.join(BACKENDS)}")


# -- the serving loop --------------------------------------------------------------------------
@dataclass
class _Job:
    """One request handed from an HTTP thread to the serving thread."""

    text: str
    version: str | None  # from a `{model}@{version}` request: must be the loaded one
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # the HTTP thread gave up waiting: do not bother generating
    answer: str | None = None
    adapter: dict | None = None
    error: tuple[int, str, str] | None = None  # (HTTP status, type, message)


class Server:
    """Owns the backend, the reloader and the job queue; `run()` is the serving loop."""

    def __init__(self, model: str, backend: Backend, reloader: AdapterReloader, log: _EventLog):
        self.model = model
        self.backend = backend
        self.reloader = reloader
        self.log = log
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.stopping = False
        self.served = 0
        # Replaced (never mutated) by the serving thread; HTTP threads read the reference.
        self.state: dict[str, Any] = {"adapter": None, "last_reload": None}

    # Called on the serving thread only.
    def _reload(self, first: bool) -> None:
        try:
            record = self.reloader.reload_now() if first else self.reloader.poll()
        except OSError as exc:  # the model did (or did not) reload; only loaded.json failed
            self.log("report-failed", file=str(self.reloader.loaded_file), error=str(exc))
            record = None
        if record is None:
            return
        _report(self.log, record)
        adapter = None
        if record["version_id"] is not None:
            adapter = {k: record[k] for k in ("version_id", "sha256", "loaded_at")}
        last = {k: record.get(k) for k in ("ok", "error", "attempted_at", "seq")}
        self.state = {"adapter": adapter, "last_reload": last}

    def _answer(self, job: _Job) -> None:
        current = self.reloader.current
        adapter = {"version_id": current["version_id"], "sha256": current["sha256"]} if current else None
        loaded = current["version_id"] if current else None
        if job.version is not None and job.version != loaded:
            job.error = (
                404,
                "model_not_found",
                f"{self.model}@{job.version} is not loaded (loaded: {self.model}@{loaded or 'base'})",
            )
            return
        try:
            job.answer = self.backend.generate(job.text)
            job.adapter = adapter
        except Exception as exc:  # a backend failure fails this request, not the server
            job.error = (500, "server_error", f"backend {self.backend.name}: {type(exc).__name__}: {exc}")
            self.log("generate-failed", error=str(job.error[2]))

    def load_initial(self) -> None:
        """Load what `active` points to now (before the HTTP server answers anything)."""
        self._reload(first=True)

    def run(self) -> None:
        """Serve until `stopping`; call on the main thread (it receives the signals)."""
        while not self.stopping:
            self._reload(first=False)
            try:
                job = self.jobs.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                continue
            if not job.abandoned:
                self._answer(job)
                self.served += 1
            job.done.set()
        # Whatever is still queued gets a clear refusal instead of a timeout.
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.error = (503, "server_shutting_down", "the server is shutting down")
            job.done.set()


def _handler(server: Server, request_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "adapterctl-serve"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the reload events

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _fail(self, status: int, kind: str, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            state = server.state
            if path == "/health":
                self._send(
                    200,
                    {
                        "status": "ok",
                        "model": server.model,
                        "adapter": state["adapter"],
                        "pid": os.getpid(),
                        "last_reload": state["last_reload"],
                        "backend": server.backend.name,
                    },
                )
            elif path == "/v1/models":
                entry = {"object": "model", "owned_by": "adapterctl", "adapter": state["adapter"]}
                data = [{"id": server.model, **entry}]
                if state["adapter"]:
                    data.append({"id": f"{server.model}@{state['adapter']['version_id']}", **entry})
                self._send(200, {"object": "list", "data": data})
            else:
                self._fail(404, "not_found", f"no such endpoint: GET {path}")

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/v1/chat/completions":
                self._drain()
                self._fail(404, "not_found", f"no such endpoint: POST {path}")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                self._fail(411, "invalid_request_error", "Content-Length required")
                return
            if length > MAX_REQUEST_BYTES:
                self.close_connection = True
                self._fail(413, "invalid_request_error", f"request body over {MAX_REQUEST_BYTES} bytes")
                return
            try:
                request = json.loads(self.rfile.read(length).decode("utf-8"))
                text, version = self._parse(request)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._fail(400, "invalid_request_error", f"body is not JSON: {exc}")
                return
            except ValueError as exc:
                self._fail(400, "invalid_request_error", str(exc))
                return
            except LookupError as exc:
                self._fail(404, "model_not_found", str(exc.args[0]))
                return
            if server.stopping:
                self._fail(503, "server_shutting_down", "the server is shutting down")
                return
            job = _Job(text, version)
            server.jobs.put(job)
            if not job.done.wait(request_timeout_s):
                job.abandoned = True
                self._fail(504, "timeout", f"no answer within {request_timeout_s:g} s")
                return
            if job.error:
                self._fail(*job.error)
                return
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": server.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": job.answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "adapter": job.adapter,
                },
            )

        def _drain(self) -> None:
            with contextlib.suppress(ValueError):
                length = int(self.headers.get("Content-Length", "0"))
                if 0 < length <= MAX_REQUEST_BYTES:
                    self.rfile.read(length)
                elif length:
                    self.close_connection = True

        def _parse(self, request: object) -> tuple[str, str | None]:
            """(the last user message's text, the version asked for); ValueError/LookupError if bad."""
            if not isinstance(request, dict):
                raise ValueError("body must be a JSON object")
            if request.get("stream"):
                raise ValueError("stream: true is not supported")
            name = request.get("model", server.model)
            version = None
            if name != server.model:
                base, at, version = str(name).partition("@")
                if base != server.model or not at or not version:
                    raise LookupError(f"unknown model {name!r}; this server serves {server.model!r}")
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise ValueError("messages has no user message")
            content = users[-1].get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                content = " ".join(p for p in parts if isinstance(p, str)) if parts else None
            if not isinstance(content, str):
                raise ValueError("the last user message has no text content")
            return content, version

    return Handler


# -- entry point -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterctl serve",
        description="Reference serving process: OpenAI-compatible HTTP API; reloads "
        "{adapter-dir}/{model}/active on SIGUSR1.",
    )
    parser.add_argument("--model", required=True, help="model name (the directory under --adapter-dir)")
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--pidfile", required=True, help="loaded.json is written next to it")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (see the log)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backend", choices=BACKENDS, default="standin")
    parser.add_argument("--base", help="base model directory (backend peft)")
    parser.add_argument("--log", help="append event lines here (default: stderr)")
    parser.add_argument(
        "--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds per request"
    )
    return parser


def _single_blas_thread() -> None:
    """Before numpy loads: one BLAS thread (the tiny model gains nothing; a busy box loses a lot)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code (0 clean stop, 1 cannot start, 2 usage)."""
    _single_blas_thread()
    args = _parser().parse_args(argv)
    server: Server | None = None

    def _stop(signum: int, frame: object) -> None:
        if server is not None:
            server.stopping = True
        else:
            raise KeyboardInterrupt  # still starting: nothing to clean up beyond the finally blocks

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        log = _EventLog(args.log)
    except OSError as exc:
        print(f"serve: cannot open log {args.log}: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            backend = make_backend(args.backend, args.base)
        except ServeError as exc:
            log("start-failed", error=str(exc))
            print(f"serve: {exc}", file=sys.stderr)
            return 1
        reloader = AdapterReloader(args.adapter_dir, args.model, Path(args.pidfile), backend.load)
        server = Server(args.model, backend, reloader, log)
        try:
            httpd = ThreadingHTTPServer((args.host, args.port), _handler(server, args.request_timeout))
        except OSError as exc:
            log("start-failed", error=f"cannot listen on {args.host}:{args.port}: {exc}")
            print(f"serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        httpd.daemon_threads = True
        try:
            try:
                reloader.install()
            except OSError as exc:
                log("start-failed", error=f"cannot write pidfile {args.pidfile}: {exc}")
                return 1
            server.load_initial()
            host, port = httpd.server_address[:2]
            log("start", model=args.model, backend=backend.name, url=f"http://{host}:{port}")
            http_thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
            http_thread.start()
            try:
                server.run()
            finally:
                httpd.shutdown()  # stop accepting; handler threads still waiting get 503 from run()
            log("stop", version_id=reloader.session_metadata()[args.model], served=server.served)
            return 0
        finally:
            reloader.uninstall()
            httpd.server_close()
    except KeyboardInterrupt:
        return 0
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
