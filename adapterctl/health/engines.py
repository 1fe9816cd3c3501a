"""Health engines: what turns a suite input into an output for one release on one endpoint.

`command`: any program on the endpoint that reads one input line on stdin and prints one output
line. `http`: POSTs each input to an OpenAI-compatible (or custom JSON) endpoint of the live
service. `mlx` and `llamacpp` plug in behind the same interface.

The modules import one way: engines (http, the factory) → engine_mlx / engine_llamacpp (imported
by make_engine only, as they also run as `python -m` on the endpoint) → command → base.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shlex
import socket
import threading
from collections.abc import Mapping
from urllib.parse import urlsplit

from adapterctl.errors import ConfigError, PhaseError
from adapterctl.health.base import HealthEngine, HealthTarget, check_template
from adapterctl.health.command import CommandEngine

ENGINES = ("command", "mlx", "llamacpp", "http")
HTTP_PLACEHOLDERS = ("endpoint", "model", "version")
HTTP_MODES = ("openai", "json")
OPENAI_RESPONSE_PATH = "choices.0.message.content"
INPUT_PLACEHOLDER = "{input}"

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
        check_template([url], HTTP_PLACEHOLDERS, "health url")
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
            check_template([model], HTTP_PLACEHOLDERS, "health model")
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
