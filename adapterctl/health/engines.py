"""Health engines: what turns a suite input into an output for one release on one endpoint.

`command`: any program on the endpoint that reads one input line on stdin and prints one output
line. `http`: POSTs each input to an OpenAI-compatible (or custom JSON) endpoint of the live
service. `mlx` and `llamacpp` plug in behind the same interface.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import selectors
import shlex
import socket
import string
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from adapterctl.errors import ConfigError, PhaseError, TransportError
from adapterctl.transports.base import Transport

ENGINES = ("command", "mlx", "llamacpp", "http")
PLACEHOLDERS = ("release", "model", "version", "endpoint", "adapter_dir")
HTTP_PLACEHOLDERS = ("endpoint", "model", "version")
HTTP_MODES = ("openai", "json")
OPENAI_RESPONSE_PATH = "choices.0.message.content"
INPUT_PLACEHOLDER = "{input}"

_STDERR_KEEP = 8192  # bytes of stderr kept for error messages
_STDERR_LINES = 5
_MAX_LINE = 1 << 20  # an output line longer than this means the program is not line-oriented
_CLOSE_GRACE_S = 1.0


@dataclass(frozen=True)
class HealthTarget:
    """The release a health check exercises; paths are on the endpoint."""

    endpoint: str
    model: str
    version_id: str
    release_path: str  # releases/<version_id> or the `active` link
    adapter_dir: str
    base_model: str | None
    transport: Transport = field(compare=False, repr=False)


class HealthEngine(ABC):
    """Produces outputs for one target between start() and close(). Use as a context manager."""

    name = "engine"

    @abstractmethod
    def start(self, target: HealthTarget) -> None:
        """Load the model for `target`. Raises PhaseError when it cannot."""

    @abstractmethod
    def generate(self, prompt: str) -> str:
        """Return the output for `prompt`. Raises PhaseError when the engine fails."""

    @abstractmethod
    def close(self) -> None:
        """Release everything start() acquired; safe to call twice, never raises."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the dry-run plan."""

    def __enter__(self) -> HealthEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _show(argv: Sequence[str]) -> str:
    # Like shlex.join, but leaves {placeholders} readable.
    return " ".join(a if a and not re.search(r"[\s'\"\\]", a) else shlex.quote(a) for a in argv)


def _check_template(
    argv: Sequence[str], allowed: Sequence[str] = PLACEHOLDERS, what: str = "health command argument"
) -> None:
    for arg in argv:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"{what} {arg!r}: {exc}", "write literal braces as {{ and }}") from None
        for name in names:
            if name not in allowed:
                raise ConfigError(
                    f"{what} {arg!r}: unknown placeholder {{{name}}}",
                    f"valid placeholders: {', '.join('{' + p + '}' for p in allowed)}",
                )


class CommandEngine(HealthEngine):
    """Runs `argv` once on the endpoint and talks to it one line in, one line out."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float = 30.0, env: Mapping[str, str] | None = None):
        """Raises ConfigError for an empty command, an unknown placeholder or a bad timeout."""
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(
                "health command must be a non-empty list of strings",
                'e.g. command: [python3, translate.py, "{release}"]',
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"health timeout_s must be a positive number of seconds, not {timeout_s!r}")
        _check_template(argv)
        self.argv_template = tuple(argv)
        self.timeout_s = float(timeout_s)
        self.env = dict(env or {})
        self._proc: subprocess.Popen | None = None
        self._target: HealthTarget | None = None
        self._argv: tuple[str, ...] = ()
        self._sel: selectors.BaseSelector | None = None
        self._out = bytearray()
        self._out_eof = False
        self._err = bytearray()
        self._failed: PhaseError | None = None

    def describe(self) -> str:
        return f"command: {_show(self.argv_template)}"

    def start(self, target: HealthTarget) -> None:
        """Spawn the program through target.transport. Raises PhaseError if it cannot start."""
        if self._proc is not None:
            raise RuntimeError("CommandEngine.start() called twice")
        values = {
            "release": target.release_path,
            "model": target.model,
            "version": target.version_id,
            "endpoint": target.endpoint,
            "adapter_dir": target.adapter_dir,
        }
        self._target = target
        self._argv = tuple(a.format_map(values) for a in self.argv_template)
        env = {
            **self.env,
            "ADAPTERCTL_RELEASE": target.release_path,
            "ADAPTERCTL_MODEL": target.model,
            "ADAPTERCTL_VERSION": target.version_id,
        }
        try:
            proc = target.transport.spawn(self._argv, env=env)
        except TransportError as exc:
            raise PhaseError(
                f"{self._where()}: cannot start health command {shlex.join(self._argv)}: {exc.message}",
                exc.hint or "check that the command exists on the endpoint",
            ) from exc
        self._proc = proc
        self._sel = selectors.DefaultSelector()
        # Non-blocking pipes + one selector: a stalled program can never block us past the timeout.
        for stream, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
            os.set_blocking(stream.fileno(), False)
            self._sel.register(stream.fileno(), selectors.EVENT_READ, tag)
        os.set_blocking(proc.stdin.fileno(), False)

    def generate(self, prompt: str) -> str:
        """Send `prompt` as one line and return the next output line (without its newline).

        Raises PhaseError (and kills the program) if it exits, exceeds timeout_s or writes
        non-UTF-8; every later call raises the same error.
        """
        if self._failed is not None:
            raise self._failed
        if self._proc is None or self._sel is None:
            raise RuntimeError("CommandEngine.generate() called before start()")
        pending = (re.sub(r"\r\n|[\r\n]", " ", prompt) + "\n").encode("utf-8")
        stdin_fd = self._proc.stdin.fileno()
        self._sel.register(stdin_fd, selectors.EVENT_WRITE, "in")
        writing = True
        deadline = time.monotonic() + self.timeout_s
        try:
            while writing or b"\n" not in self._out:
                if self._out_eof and b"\n" not in self._out:
                    raise self._fail("exited before answering", grace_s=_CLOSE_GRACE_S)
                if len(self._out) > _MAX_LINE:
                    raise self._fail(f"wrote more than {_MAX_LINE} bytes without a newline")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._fail(f"gave no output line within {self.timeout_s:g} s (killed)")
                for key, _ in self._sel.select(remaining):
                    if key.data != "in":
                        self._read(key)
                        continue
                    try:
                        pending = pending[os.write(stdin_fd, pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""  # it closed stdin; its exit shows up as EOF on stdout
                    if not pending:
                        self._sel.unregister(stdin_fd)
                        writing = False
        finally:
            if self._sel is not None and stdin_fd in self._sel.get_map():
                self._sel.unregister(stdin_fd)
        raw, _, rest = self._out.partition(b"\n")
        self._out = bytearray(rest)
        try:
            return raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise self._fail("wrote non-UTF-8 output") from None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # EOF tells a well-behaved program to exit
        _reap(proc, _CLOSE_GRACE_S)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for stream in (proc.stdout, proc.stderr):
            stream.close()

    # -- internals ------------------------------------------------------------------------------
    def _where(self) -> str:
        t = self._target
        return f"endpoint {t.endpoint}: model {t.model}" if t else "health command"

    def _read(self, key: selectors.SelectorKey) -> None:
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._sel.unregister(key.fd)
            if key.data == "out":
                self._out_eof = True
        elif key.data == "out":
            self._out += chunk
        else:
            self._err += chunk
            del self._err[:-_STDERR_KEEP]

    def _fail(self, what: str, grace_s: float = 0.0) -> PhaseError:
        """Stop the program, collect its exit code and stderr tail, and remember the error."""
        _reap(self._proc, grace_s)
        if self._proc.stdin.fileno() in self._sel.get_map():
            self._sel.unregister(self._proc.stdin.fileno())
        deadline = time.monotonic() + 0.5  # the stderr of a dead program ends almost at once
        while self._sel.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self._sel.select(remaining):
                self._read(key)
        lines = self._err.decode("utf-8", "replace").splitlines()[-_STDERR_LINES:]
        stderr = f"stderr: {' | '.join(lines)}" if lines else "no stderr output"
        self._failed = PhaseError(
            f"{self._where()}: health command {shlex.join(self._argv)} {what} "
            f"(exit code {self._proc.returncode}); {stderr}",
            "run the command by hand on the endpoint with one input line to see what it does",
        )
        return self._failed


def _reap(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait up to grace_s for `proc` to exit, then kill it; always collects its exit status."""
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        # An unkillable process (uninterruptible I/O) is left behind rather than hanging us.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


_BODY_KEEP = 200  # characters of a response body quoted in an error
_MAX_BODY = 8 << 20  # a health answer larger than this is not an answer


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= _BODY_KEEP else text[:_BODY_KEEP] + "…"


def _fill_input(template: object, text: str) -> object:
    """A copy of the JSON value `template` with "{input}" replaced by `text` in every string."""
    if isinstance(template, str):
        return template.replace(INPUT_PLACEHOLDER, text)
    if isinstance(template, Mapping):
        return {k: _fill_input(v, text) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_fill_input(v, text) for v in template]
    return template


def _mentions_input(template: object) -> bool:
    if isinstance(template, str):
        return INPUT_PLACEHOLDER in template
    if isinstance(template, Mapping):
        return any(_mentions_input(v) for v in template.values())
    if isinstance(template, list | tuple):
        return any(_mentions_input(v) for v in template)
    return False


def _follow(value: object, path: str) -> object:
    """Walk a dotted path (`choices.0.message.content`); raises LookupError naming the missing step."""
    done: list[str] = []
    for step in path.split("."):
        if isinstance(value, Mapping) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.lstrip("-").isdigit() and -len(value) <= int(step) < len(value):
            value = value[int(step)]
        else:
            kind = type(value).__name__ if not isinstance(value, Mapping) else "object"
            raise LookupError(f"no {step!r} at {'.'.join(done) or '(top level)'} (a JSON {kind})")
        done.append(step)
    return value


class HttpEngine(HealthEngine):
    """POSTs each input to an HTTP endpoint of the live service and reads the answer out of its JSON.

    `openai` mode sends a chat completion (`model`, one user message, temperature 0, max_tokens 64)
    and reads `choices.0.message.content`; `json` mode sends `request_template` with "{input}"
    replaced and reads `response_path`. Every request has a hard total deadline of `timeout_s`
    (connect, send, headers and body together): a stalled or trickling server cannot block it.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        mode: str = "openai",
        *,
        model: str | None = None,
        request_template: Mapping | None = None,
        response_path: str | None = None,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ):
        """Raises ConfigError for a bad url, mode, template, path, timeout or headers."""
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(
                "health engine 'http' needs a `url:`", "e.g. url: http://127.0.0.1:8080/v1/chat/completions"
            )
        _check_template([url], HTTP_PLACEHOLDERS, "health url")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"health url {url!r} must start with http:// or https://")
        if mode not in HTTP_MODES:
            raise ConfigError(f"health mode {mode!r} is not one of: {', '.join(HTTP_MODES)}")
        if mode == "json":
            if not isinstance(request_template, Mapping):
                raise ConfigError(
                    "health mode 'json' needs a `request_template:` JSON object",
                    'e.g. request_template: {prompt: "{input}"}',
                )
            if not _mentions_input(request_template):
                raise ConfigError('health request_template must contain "{input}" somewhere')
            if not response_path:
                raise ConfigError(
                    "health mode 'json' needs a `response_path:`", "e.g. response_path: choices.0.text"
                )
        elif request_template is not None:
            raise ConfigError("health request_template is only used with mode: json")
        if response_path is not None and (
            not isinstance(response_path, str) or not all(response_path.split("."))
        ):
            raise ConfigError(f"health response_path {response_path!r} must be a dotted path like a.0.b")
        if model is not None:
            if not isinstance(model, str) or not model:
                raise ConfigError(f"health model must be a non-empty string, not {model!r}")
            _check_template([model], HTTP_PLACEHOLDERS, "health model")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"health timeout_s must be a positive number of seconds, not {timeout_s!r}")
        headers = dict(headers or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ConfigError("health headers must map header names to strings")
        self.url_template = url
        self.mode = mode
        self.model_template = model
        self.request_template = request_template
        self.response_path = response_path or OPENAI_RESPONSE_PATH
        self.timeout_s = float(timeout_s)
        self.headers = headers
        self._target: HealthTarget | None = None
        self._url = ""
        self._model = ""

    def describe(self) -> str:
        return f"http: POST {self.url_template}"

    def start(self, target: HealthTarget) -> None:
        """Fill in the url and model name for `target`; no request is made yet."""
        values = {"endpoint": target.endpoint, "model": target.model, "version": target.version_id}
        self._target = target
        self._url = self.url_template.format_map(values)
        self._model = self.model_template.format_map(values) if self.model_template else target.model
        parts = urlsplit(self._url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PhaseError(f"{self._where()}: health url {self._url!r} is not an http(s) URL")

    def generate(self, prompt: str) -> str:
        """POST `prompt` and return the answer text; raises PhaseError on any failure or timeout."""
        if self._target is None:
            raise RuntimeError("HttpEngine.generate() called before start()")
        if self.mode == "openai":
            payload: object = {
                "model": self._model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": 64,
            }
        else:
            payload = _fill_input(self.request_template, prompt)
        status, body = self._post(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        if not 200 <= status < 300:
            raise self._error(f"HTTP {status}", body, status)
        try:
            answer = _follow(json.loads(body.decode("utf-8")), self.response_path)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._error("response is not JSON", body, status) from None
        except LookupError as exc:
            raise self._error(f"response has no {self.response_path}: {exc}", body, status) from None
        if not isinstance(answer, str):
            what = "null" if answer is None else f"a JSON {type(answer).__name__}"
            raise self._error(f"{self.response_path} is {what}, not a string", body, status)
        return answer.strip()

    def close(self) -> None:
        self._target = None

    # -- internals ------------------------------------------------------------------------------
    def _where(self) -> str:
        t = self._target
        return f"endpoint {t.endpoint}: model {t.model}" if t else "http health engine"

    def _error(self, what: str, body: bytes = b"", status: int | None = None) -> PhaseError:
        parts = [f"{self._where()}: POST {self._url}: {what}"]
        if status is not None and not what.startswith("HTTP "):
            parts.append(f"(HTTP {status})")
        if body:
            parts.append(f"body: {_excerpt(body)}")
        return PhaseError(
            " ".join(parts),
            f"check the service with: curl -sS -X POST {shlex.quote(self._url)} "
            "-H 'Content-Type: application/json' -d '...'",
        )

    def _post(self, data: bytes) -> tuple[int, bytes]:
        """One POST under a hard deadline: a watchdog shuts the socket down when timeout_s is up."""
        parts = urlsplit(self._url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            conn = cls(parts.hostname, parts.port, timeout=self.timeout_s)
        except ValueError as exc:  # e.g. a non-numeric port
            raise self._error(f"invalid url: {exc}") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        if parts.username is not None:
            raise self._error("credentials in the url are not supported; use headers: {Authorization: ...}")
        expired = threading.Event()
        connected: list[socket.socket] = []  # conn.sock is dropped once a closing response arrives

        def watchdog() -> None:
            expired.set()
            sock = connected[0] if connected else conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread

        timer = threading.Timer(self.timeout_s, watchdog)
        timer.daemon = True
        status = None
        timer.start()
        try:
            conn.connect()
            connected.append(conn.sock)
            if expired.is_set():
                raise TimeoutError
            conn.request("POST", path, body=data, headers=headers)
            response = conn.getresponse()
            status = response.status
            body = response.read(_MAX_BODY + 1)
            if expired.is_set():
                raise TimeoutError
        except TimeoutError:
            raise self._error(f"no complete answer within {self.timeout_s:g} s (timed out)") from None
        except ConnectionRefusedError:
            raise self._error("connection refused (is the service running and listening there?)") from None
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise self._error(f"no complete answer within {self.timeout_s:g} s (timed out)") from None
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise self._error(f"request failed: {reason}", status=status) from None
        finally:
            timer.cancel()
            conn.close()
        if len(body) > _MAX_BODY:
            raise self._error(f"response body larger than {_MAX_BODY} bytes", body[:_BODY_KEEP], status)
        return status, body


class ModelProcessEngine(CommandEngine):
    """A CommandEngine whose program loads a model first: `start()` waits for it to answer an
    empty readiness line, so loading never counts against the first sentence's latency limit.

    Subclasses set `kind` (for messages) and `hint` (what to check when loading fails).
    """

    kind = "model"
    hint: str | None = None

    def start(self, target: HealthTarget) -> None:
        """Start the program and wait until the model is loaded. Raises PhaseError naming the
        command and its stderr (e.g. a missing model file)."""
        super().start(target)
        try:
            ready = super().generate("")  # the readiness probe: answered once the model is loaded
        except PhaseError as exc:
            raise PhaseError(f"{exc.message} (while loading the model)", self.hint) from exc
        if ready != "":
            raise PhaseError(
                f"{self._where()}: {_show(self._argv)} answered the readiness probe with {ready!r}, "
                f"not an empty line; is it adapterctl's {self.kind} engine?",
                self.hint,
            )


def spec_for_endpoint(
    spec: Mapping, kind: str, artifact_format: str | None = None, base_gguf: str | None = None
) -> dict:
    """A model's health spec as it runs on one endpoint.

    `engine: auto` becomes mlx on `mlx` endpoints and llamacpp on `gguf` ones (the other engine's
    keys are dropped). The model engines default to the endpoint's converted artifact: a fused MLX
    model is the release itself (no adapter); a GGUF LoRA is {release}/adapter.gguf on the
    endpoint's base GGUF. Keys whose value is None count as absent.
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("engine") == "auto":
        spec["engine"] = "mlx" if kind == "mlx" else "llamacpp"
        other = ("gguf", "lora", "base_gguf", "n_ctx", "stop") if kind == "mlx" else ("base", "adapter")
        for key in other:
            spec.pop(key, None)
    if spec.get("engine") == "mlx" and artifact_format == "fused":
        spec["base"], spec["adapter"] = "{release}", "none"
    if spec.get("engine") == "llamacpp" and artifact_format == "lora" and not {"gguf", "lora"} & spec.keys():
        spec["lora"] = "{release}/adapter.gguf"
        if base_gguf is not None:
            spec.setdefault("base_gguf", base_gguf)
    return spec


def make_engine(spec: Mapping) -> HealthEngine:
    """Build the engine a config's health section describes.

    Keys: `engine` (default command); for `command`: command, timeout_s, env; for `http`: url,
    mode, model, request_template, response_path, timeout_s, headers. Keys whose value is None
    count as absent and unrelated keys are ignored, so `dataclasses.asdict(HealthSpec)` works.
    Raises ConfigError for an unknown or not-yet-available engine, or an invalid spec.
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    kind = spec.get("engine", "command")
    if kind == "auto":
        raise ConfigError(
            "health engine 'auto' is resolved per endpoint (mlx or llamacpp by its kind)",
            "call spec_for_endpoint() first",
        )
    if kind == "mlx":  # imported here: their modules are also run as `python -m` on the endpoint
        from adapterctl.health.engine_mlx import make as make_mlx

        return make_mlx(spec)
    if kind == "llamacpp":
        from adapterctl.health.engine_llamacpp import make as make_llamacpp

        return make_llamacpp(spec)
    if kind == "http":
        return HttpEngine(
            spec.get("url", ""),
            spec.get("mode", "openai"),
            model=spec.get("model"),
            request_template=spec.get("request_template"),
            response_path=spec.get("response_path"),
            timeout_s=spec.get("timeout_s", 30.0),
            headers=spec.get("headers"),
        )
    if kind != "command":
        raise ConfigError(f"unknown health engine {kind!r}; valid engines: {', '.join(ENGINES)}")
    if "command" not in spec:
        raise ConfigError(
            "health engine 'command' needs a `command:` list",
            'e.g. command: [python3, translate.py, "{release}"]',
        )
    env = spec.get("env") or {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ConfigError("health env must map variable names to strings", "quote numbers: THREADS: '4'")
    return CommandEngine(spec["command"], spec.get("timeout_s", 30.0), env)
