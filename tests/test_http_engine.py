"""The `http` health engine against the real `adapterctl serve` and tiny misbehaving servers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_serve import start_server
from test_serving import MODEL, make_release, point_active

from adapterctl.config import load_config
from adapterctl.errors import ConfigError, PhaseError
from adapterctl.health import HealthTarget, make_engine, resolve_suite, run_suite
from adapterctl.health.engines import HttpEngine
from adapterctl.transports.local import LocalTransport

DEFAULT = resolve_suite("translation_en_es", Path("."))


def target(version: str = "cycle1_20261123_0a1b2c3d") -> HealthTarget:
    return HealthTarget(
        endpoint="mac-1",
        model=MODEL,
        version_id=version,
        release_path=f"/srv/adapters/{MODEL}/active",
        adapter_dir="/srv/adapters",
        base_model=None,
        transport=LocalTransport("mac-1"),
    )


@pytest.fixture
def serve_release(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start the real server on `active` → a new release; return its base url."""
    procs = []

    def start(seed: int = 1, zero_b: bool = False) -> str:
        adapter_dir = tmp_path / f"adapters{len(procs)}"
        (adapter_dir / MODEL).mkdir(parents=True)
        point_active(adapter_dir, make_release(adapter_dir, seed=seed, zero_b=zero_b))
        served = start_server(adapter_dir, tmp_path / f"run{len(procs)}")
        procs.append(served.proc)
        return served.url

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=5)


class Tiny:
    """A tiny in-process http.server on 127.0.0.1 whose POST behaviour a test supplies."""

    def __init__(self, on_post: Callable[[BaseHTTPRequestHandler, bytes], None]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                on_post(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny() -> Iterator[Callable[..., Tiny]]:
    servers: list[Tiny] = []

    def start(on_post: Callable[[BaseHTTPRequestHandler, bytes], None]) -> Tiny:
        servers.append(Tiny(on_post))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_length: bool = True) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def run_one(engine: HttpEngine, text: str = "Amen.") -> str:
    with engine:
        engine.start(target())
        return engine.generate(text)


# -- against the real server ----------------------------------------------------------------------
@pytest.mark.heavy
def test_good_adapter_passes_the_default_suite_over_http(serve_release):
    url = serve_release(seed=1)
    engine = make_engine({"engine": "http", "url": url + "/v1/chat/completions", "timeout_s": 5})

    result = run_suite(DEFAULT, engine, target())

    assert result.all_passed, result.to_dict()
    assert result.engine == f"http: POST {url}/v1/chat/completions"
    assert [c.output for c in result.cases][0] == "Buenos días, bienvenidos al servicio."


@pytest.mark.heavy
def test_all_zero_lora_b_adapter_fails_the_suite_with_english_outputs(serve_release):
    url = serve_release(seed=2, zero_b=True)
    engine = make_engine({"engine": "http", "url": url + "/v1/chat/completions"})

    result = run_suite(DEFAULT, engine, target())

    assert not result.all_passed and result.error is None
    assert [c.output for c in result.failures] == [c.input for c in DEFAULT.cases[:4]]
    assert "expected any of ['buen', 'servicio']" in result.failures[0].reason


@pytest.mark.heavy
def test_json_mode_reads_the_answer_through_response_path(serve_release):
    url = serve_release(seed=1)
    engine = make_engine(
        {
            "engine": "http",
            "url": url + "/v1/chat/completions",
            "mode": "json",
            "request_template": {"model": MODEL, "messages": [{"role": "user", "content": "{input}"}]},
            "response_path": "choices.0.message.content",
        }
    )
    result = run_suite(DEFAULT, engine, target())
    assert result.all_passed, result.to_dict()


@pytest.mark.heavy
def test_versioned_model_name_checks_identity(serve_release):
    url = serve_release(seed=1)
    wrong = make_engine({"engine": "http", "url": url + "/v1/chat/completions", "model": "{model}@{version}"})
    with pytest.raises(PhaseError, match=r"endpoint mac-1: model gemma_4b: POST .* HTTP 404.*is not loaded"):
        run_one(wrong)


# -- json mode against a custom server -----------------------------------------------------------
def test_json_mode_fills_the_template_and_follows_the_path(tiny):
    seen: list[dict] = []

    def on_post(handler, body):
        seen.append(json.loads(body))
        answer = {"result": {"items": [{"text": "  Amén.\n"}]}, "n": 1}
        reply(handler, 200, json.dumps(answer).encode())

    server = tiny(on_post)
    engine = make_engine(
        {
            "engine": "http",
            "url": server.url + "/generate?m={model}",
            "mode": "json",
            "request_template": {"prompt": "EN: {input}", "options": {"n": 1, "stop": ["\n"]}},
            "response_path": "result.items.0.text",
            "headers": {"X-Token": "t0k"},
        }
    )
    assert run_one(engine, "Amen.") == "Amén."
    assert seen == [{"prompt": "EN: Amen.", "options": {"n": 1, "stop": ["\n"]}}]


@pytest.mark.parametrize(
    "status, body, message",
    [
        (503, b'{"error": "model is loading"}', r"HTTP 503 body: \{\"error\": \"model is loading\"\}"),
        (200, b"<html>oops</html>", r"response is not JSON \(HTTP 200\) body: <html>oops</html>"),
        (200, b'{"choices": []}', r"response has no choices.0.message.content: no '0' at choices"),
        (200, b'{"choices": [{"message": {"content": null}}]}', r"content is null, not a string"),
    ],
    ids=["http-503", "not-json", "missing-path", "null-content"],
)
def test_bad_answers_are_phase_errors_naming_endpoint_model_url_status_and_body(tiny, status, body, message):
    server = tiny(lambda handler, _: reply(handler, status, body))
    engine = make_engine({"engine": "http", "url": server.url + "/v1/chat/completions", "timeout_s": 5})
    with pytest.raises(PhaseError, match=message) as caught:
        run_one(engine)
    assert f"endpoint mac-1: model gemma_4b: POST {server.url}/v1/chat/completions" in caught.value.message


# -- never blocks ----------------------------------------------------------------------------------
def test_connection_refused_is_a_phase_error_at_once():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = make_engine({"engine": "http", "url": f"http://127.0.0.1:{port}/v1/chat/completions"})
    started = time.monotonic()
    with pytest.raises(
        PhaseError, match=rf"POST http://127.0.0.1:{port}/v1/chat/completions: connection refused"
    ):
        run_one(engine)
    # not waited out: far below the default timeout_s (30 s); loose enough for a loaded machine
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("behaviour", ["hang", "trickle"])
def test_a_server_that_hangs_or_trickles_is_cut_off_at_timeout_s(tiny, behaviour):
    release = threading.Event()

    def on_post(handler, _):
        if behaviour == "hang":
            release.wait(30)
            return
        # Headers at once, then one body byte every 0.1 s: each read is quick, the total is not.
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(300):
            if release.is_set():
                return
            try:
                handler.wfile.write(b" ")
                handler.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    server = tiny(on_post)
    engine = make_engine({"engine": "http", "url": server.url + "/v1/chat/completions", "timeout_s": 0.7})
    started = time.monotonic()
    try:
        with pytest.raises(PhaseError, match=r"no complete answer within 0.7 s \(timed out\)"):
            run_one(engine)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    # cut off at timeout_s, not when the server gives up (30 s): the upper bound is loose for a loaded machine
    assert 0.6 < elapsed < 10


# -- configuration ---------------------------------------------------------------------------------
def test_make_engine_validates_the_http_spec():
    with pytest.raises(ConfigError, match="needs a `url:`"):
        make_engine({"engine": "http"})
    with pytest.raises(ConfigError, match=r"unknown placeholder \{release\}"):
        make_engine({"engine": "http", "url": "http://h/{release}"})
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        make_engine({"engine": "http", "url": "ftp://h/x"})
    with pytest.raises(ConfigError, match="needs a `request_template:`"):
        make_engine({"engine": "http", "url": "http://h/x", "mode": "json", "response_path": "a"})
    with pytest.raises(ConfigError, match=r'must contain "\{input\}"'):
        make_engine(
            {"engine": "http", "url": "http://h/x", "mode": "json", "request_template": {"p": "x"}}
            | {"response_path": "a"}
        )
    with pytest.raises(ConfigError, match="needs `base:`"):  # another engine's spec is checked by that engine
        make_engine({"engine": "mlx"})
    assert make_engine({"engine": "http", "url": "http://h:1/v1", "timeout_s": 2}).describe() == (
        "http: POST http://h:1/v1"
    )


def _config(tmp_path: Path, health: str) -> Path:
    text = (
        f"models:\n  {MODEL}:\n    source: src\n    convert: peft\n    health:\n{health}"
        "endpoints:\n  mac-1:\n    host: local\n    adapter_dir: ep\n    kind: mlx\n    reload_method: none\n"
    )
    path = tmp_path / "adapterctl.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_accepts_an_http_health_section_and_asdict_builds_the_engine(tmp_path):
    health = (
        "      engine: http\n      url: 'http://127.0.0.1:8080/generate'\n      mode: json\n"
        "      request_template: {prompt: '{input}', max_tokens: 64, stream: false}\n"
        "      response_path: choices.0.text\n      timeout_s: 3\n      headers: {Authorization: Bearer x}\n"
    )
    spec = load_config(_config(tmp_path, health)).model(MODEL).health
    assert (spec.engine, spec.url, spec.mode, spec.response_path) == (
        "http",
        "http://127.0.0.1:8080/generate",
        "json",
        "choices.0.text",
    )
    assert spec.request_template == {"prompt": "{input}", "max_tokens": 64, "stream": False}
    engine = make_engine(asdict(spec))
    assert isinstance(engine, HttpEngine) and engine.timeout_s == 3.0 and engine.headers
    assert engine.describe() == "http: POST http://127.0.0.1:8080/generate"


@pytest.mark.parametrize(
    "health, message",
    [
        ("      engine: http\n", "health.url: required when engine is 'http'"),
        ("      engine: http\n      url: 127.0.0.1:8080\n", "must start with http:// or https://"),
        (
            "      engine: http\n      url: http://h/x\n      command: [x]\n",
            "only used when engine is 'command'",
        ),
        ("      command: [x]\n      url: http://h/x\n", "health.url: only used when engine is 'http'"),
        ("      engine: http\n      url: http://h/x\n      mode: json\n", "required when mode is 'json'"),
        (
            "      engine: http\n      url: http://h/x\n      mode: json\n"
            "      request_template: {p: x}\n      response_path: a\n",
            'must contain "{input}"',
        ),
        ("      engine: http\n      url: http://h/x\n      mode: grpc\n", "expected one of: openai, json"),
    ],
    ids=["no-url", "url-scheme", "command-on-http", "url-on-command", "json-incomplete", "no-input", "mode"],
)
def test_config_rejects_bad_http_health_sections(tmp_path, health, message):
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, health))
    assert message in caught.value.message and "adapterctl.yaml:" in caught.value.message
