"""`adapterctl serve`: the reference HTTP server, as a real process on 127.0.0.1 with real signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_serving import MODEL, SENTENCES, _env, _sha, make_release, point_active, wait_for

pytestmark = pytest.mark.heavy  # runs `adapterctl serve` as a subprocess

ROOT = Path(__file__).resolve().parents[1]
GOOD_MORNING = "Good morning, welcome to the service."


def http_json(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    """GET (body None) or POST JSON to `url`; return (status, decoded JSON), also for 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Served:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    pidfile: Path
    loaded: Path
    log: Path

    def health(self) -> dict:
        status, body = http_json(self.url + "/health")
        assert status == 200, body
        return body

    def chat(self, text: str, model: str = MODEL, timeout: float = 5.0) -> tuple[int, dict]:
        body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0}
        return http_json(self.url + "/v1/chat/completions", body, timeout)

    def reload(self, version: str | None) -> dict:
        """SIGUSR1, then wait until /health reports a reload attempt newer than the current one."""
        seq = self.health()["last_reload"]["seq"]
        self.proc.send_signal(signal.SIGUSR1)

        def fresh() -> dict | None:
            health = self.health()
            return health if health["last_reload"]["seq"] > seq else None

        health = wait_for(fresh, f"/health after SIGUSR1 (expecting {version})")
        return health  # type: ignore[return-value]


def start_server(adapter_dir: Path, run_dir: Path, *extra: str) -> Served:
    """Start `python -m adapterctl serve --backend standin` on a free port; wait until /health answers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile, log = run_dir / "serve.pid", run_dir / "serve.log"
    argv = [sys.executable, "-m", "adapterctl", "serve", "--backend", "standin", "--model", MODEL]
    argv += ["--adapter-dir", str(adapter_dir), "--pidfile", str(pidfile), "--port", "0", "--log", str(log)]
    with open(run_dir / "stderr.txt", "ab") as err:
        proc = subprocess.Popen([*argv, *extra], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)

    def started() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {log.read_text(errors='replace')}")
        match = log.exists() and re.search(r' start .*url="(http://[^"]+)"', log.read_text(encoding="utf-8"))
        return match.group(1) if match else None

    url = wait_for(started, "serve to log its url", timeout=15)
    served = Served(proc, url, pidfile, run_dir / "loaded.json", log)  # type: ignore[arg-type]
    wait_for(served.health, "/health")
    return served


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "endpoint é" / "adapters"
    (path / MODEL).mkdir(parents=True)
    return path


@pytest.fixture
def serve(adapter_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[subprocess.Popen] = []

    def start(*extra: str) -> Served:
        served = start_server(adapter_dir, tmp_path / "run ñ", *extra)
        started.append(served.proc)
        return served

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # this child's own pid only
            proc.wait(timeout=5)


def weights_sha(adapter_dir: Path, version: str) -> str:
    return _sha(adapter_dir / MODEL / "releases" / version / "adapter_model.safetensors")


def test_health_reports_the_loaded_version_and_chat_answers_in_spanish(adapter_dir, serve):
    v1 = make_release(adapter_dir, seed=1)
    point_active(adapter_dir, v1)
    served = serve()

    health = served.health()
    assert health["status"] == "ok" and health["model"] == MODEL and health["pid"] == served.proc.pid
    assert health["adapter"]["version_id"] == v1
    assert health["adapter"]["sha256"] == weights_sha(adapter_dir, v1)
    assert health["adapter"]["loaded_at"].endswith("Z")
    assert health["last_reload"]["ok"] is True and health["last_reload"]["error"] is None
    assert served.pidfile.read_text().strip() == str(served.proc.pid)
    assert json.loads(served.loaded.read_text())["version_id"] == v1

    for english, spanish in SENTENCES.items():
        status, answer = served.chat(english)
        assert status == 200, answer
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": spanish}
        assert answer["model"] == MODEL
        assert answer["adapter"] == {"version_id": v1, "sha256": weights_sha(adapter_dir, v1)}

    status, models = http_json(served.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL, f"{MODEL}@{v1}"]


def test_sigusr1_swaps_the_served_adapter_and_the_versioned_name_follows(adapter_dir, serve):
    v1, v2 = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2, zero_b=True)
    point_active(adapter_dir, v1)
    served = serve()
    assert (
        served.chat(GOOD_MORNING, model=f"{MODEL}@{v1}")[1]["choices"][0]["message"]["content"]
        == (SENTENCES[GOOD_MORNING])
    )

    point_active(adapter_dir, v2)
    health = served.reload(v2)

    assert health["adapter"]["version_id"] == v2 and health["last_reload"]["ok"] is True
    assert health["adapter"]["sha256"] == weights_sha(adapter_dir, v2)
    status, answer = served.chat(GOOD_MORNING)
    # v2's lora_B is all zero: the model behaves like the base model and answers in English.
    assert status == 200 and answer["choices"][0]["message"]["content"] == GOOD_MORNING
    assert answer["adapter"]["version_id"] == v2
    status, refused = served.chat(GOOD_MORNING, model=f"{MODEL}@{v1}")
    assert status == 404 and v1 in refused["error"]["message"] and v2 in refused["error"]["message"]


def test_no_request_fails_during_three_sigusr1_reloads_under_load(adapter_dir, serve):
    good_a, good_b = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2)
    noop = make_release(adapter_dir, seed=3, cycle=3, zero_b=True)
    point_active(adapter_dir, good_a)
    served = serve()
    expected = {good_a: SENTENCES[GOOD_MORNING], good_b: SENTENCES[GOOD_MORNING], noop: GOOD_MORNING}

    max_requests, max_seconds = 20000, 60.0  # caps only: the loop runs until the reloads are done
    per_version = 5  # answers from each adapter before the next reload (4 x 5 >= the 20 asserted below)
    stop = threading.Event()
    results: list[tuple[float, str | None, str | None]] = []  # (latency s, version, problem)

    def load_loop() -> None:
        deadline = time.monotonic() + max_seconds
        while not stop.is_set() and time.monotonic() < deadline and len(results) < max_requests:
            started = time.perf_counter()
            version = problem = None
            try:
                status, answer = served.chat(GOOD_MORNING, timeout=10)
                if status != 200:
                    problem = f"HTTP {status}: {answer}"
                else:
                    version = answer["adapter"]["version_id"]
                    content = answer["choices"][0]["message"]["content"]
                    if content != expected.get(version):
                        problem = f"{version} answered {content!r}"
            except Exception as exc:  # any failure counts; none is expected
                problem = f"{type(exc).__name__}: {exc}"
            results.append((time.perf_counter() - started, version, problem))

    def wait_for_answers(version: str, since: int) -> None:
        """Wait until `per_version` requests after results[since] were answered by `version`."""

        def answered() -> bool:
            if problems := [problem for _, _, problem in results if problem]:
                raise AssertionError(f"{len(problems)} requests failed, first: {problems[0]}")
            if not worker.is_alive():
                raise AssertionError(f"the load loop stopped early after {len(results)} requests")
            return sum(1 for _, v, _ in results[since:] if v == version) >= per_version

        wait_for(answered, f"{per_version} answers from {version}", timeout=30)

    worker = threading.Thread(target=load_loop)
    worker.start()
    try:
        reloads = []
        serving, mark = good_a, 0
        for version in (noop, good_b, good_a):
            wait_for_answers(serving, mark)  # the current adapter answers under load, then it is swapped
            mark = len(results)
            point_active(adapter_dir, version)
            health = served.reload(version)
            reloads.append((version, health["adapter"]["version_id"], health["last_reload"]["ok"]))
            serving = version
        wait_for_answers(serving, mark)
    finally:
        stop.set()
        worker.join(timeout=15)
    assert not worker.is_alive()

    failures = [problem for _, _, problem in results if problem]
    longest_ms = max(latency for latency, _, _ in results) * 1000
    print(
        f"\nload loop across 3 SIGUSR1 reloads: {len(results)} requests, {len(failures)} failed, "
        f"longest {longest_ms:.1f} ms"
    )
    assert reloads == [(noop, noop, True), (good_b, good_b, True), (good_a, good_a, True)]
    assert failures == []
    assert len(results) >= 20
    # Every adapter was actually served during the run, each with its own behaviour.
    assert {version for _, version, _ in results} == {good_a, good_b, noop}


def test_tampered_release_fails_the_reload_and_the_old_adapter_keeps_serving(adapter_dir, serve):
    v1, v2 = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2, zero_b=True)
    point_active(adapter_dir, v1)
    served = serve()
    loaded_at = served.health()["adapter"]["loaded_at"]
    (adapter_dir / MODEL / "releases" / v2 / "adapter_model.safetensors").write_bytes(b"tampered")

    point_active(adapter_dir, v2)
    health = served.reload(v2)

    assert health["last_reload"]["ok"] is False
    assert "sha256 mismatch" in health["last_reload"]["error"]
    assert "adapter_model.safetensors" in health["last_reload"]["error"]
    assert health["adapter"] == {
        "version_id": v1,
        "sha256": weights_sha(adapter_dir, v1),
        "loaded_at": loaded_at,
    }
    status, answer = served.chat(GOOD_MORNING)
    assert status == 200 and answer["choices"][0]["message"]["content"] == SENTENCES[GOOD_MORNING]
    assert answer["adapter"]["version_id"] == v1
    assert json.loads(served.loaded.read_text())["ok"] is False
    assert "reload-failed" in served.log.read_text(encoding="utf-8")


def test_without_active_it_serves_the_base_model(adapter_dir, serve):
    served = serve()
    health = served.health()
    assert health["adapter"] is None and health["last_reload"]["ok"] is True
    status, answer = served.chat(GOOD_MORNING)
    assert status == 200 and answer["choices"][0]["message"]["content"] == GOOD_MORNING
    assert answer["adapter"] is None
    status, models = http_json(served.url + "/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"messages": []}, 400, "messages must be a non-empty list"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "no user message"),
        ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "unknown model 'other'"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
    ],
    ids=["no-messages", "no-user-message", "unknown-model", "stream"],
)
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(
    adapter_dir, serve, body, status, message
):
    point_active(adapter_dir, make_release(adapter_dir, seed=1))
    served = serve()
    got, error = http_json(served.url + "/v1/chat/completions", body)
    assert got == status and message in error["error"]["message"]
    request = urllib.request.Request(served.url + "/v1/chat/completions", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=5)
    assert bad.value.code == 400
    assert served.chat("Amen.")[1]["choices"][0]["message"]["content"] == "Amén."


def test_sigterm_exits_zero_and_removes_the_pidfile(adapter_dir, serve):
    point_active(adapter_dir, make_release(adapter_dir, seed=1))
    served = serve()
    served.chat("Amen.")

    served.proc.send_signal(signal.SIGTERM)

    assert served.proc.wait(timeout=10) == 0
    assert not served.pidfile.exists()
    assert re.search(r" stop .*served=1", served.log.read_text(encoding="utf-8"))


def test_peft_backend_without_a_base_refuses_to_start_clearly(adapter_dir, tmp_path):
    argv = [sys.executable, "-m", "adapterctl", "serve", "--backend", "peft", "--model", MODEL]
    argv += ["--adapter-dir", str(adapter_dir), "--pidfile", str(tmp_path / "p.pid"), "--port", "0"]
    proc = subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "backend peft needs --base" in proc.stderr
    assert not (tmp_path / "p.pid").exists()


def release_from(adapter_dir: Path, source: Path, cycle: int) -> str:
    """Copy a PEFT adapter directory into a verified release (RELEASE.json as transfer writes it)."""
    files = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file()}
    weights = _sha(source / "adapter_model.safetensors")
    version_id = f"cycle{cycle}_20261123_{weights[:8]}"
    release = adapter_dir / MODEL / "releases" / version_id
    release.mkdir(parents=True)
    for name, data in files.items():
        (release / name).write_bytes(data)
    meta = {"schema": 1, "model": MODEL, "version_id": version_id, "sha256": weights}
    meta["files"] = {name: _sha(release / name) for name in files}
    (release / "RELEASE.json").write_text(json.dumps(meta), encoding="utf-8")
    return version_id


@pytest.mark.heavy
def test_peft_backend_serves_the_real_tiny_model_and_hot_swaps_its_adapter(adapter_dir, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sentencepiece")
    from adapterctl import tinymodel

    built = tinymodel.build()  # cached after the first build
    good = release_from(adapter_dir, Path(built.good_adapter), cycle=1)
    bad = release_from(adapter_dir, Path(built.bad_adapter), cycle=2)
    point_active(adapter_dir, good)
    served = start_server(adapter_dir, tmp_path / "run", "--backend", "peft", "--base", str(built.base_dir))
    try:
        assert served.health()["backend"] == "peft"
        status, answer = served.chat(GOOD_MORNING, timeout=30)
        assert status == 200 and answer["adapter"]["version_id"] == good
        spanish = answer["choices"][0]["message"]["content"].casefold()
        assert "buen" in spanish or "servicio" in spanish, spanish

        point_active(adapter_dir, bad)
        assert served.reload(bad)["adapter"]["version_id"] == bad
        status, answer = served.chat(GOOD_MORNING, timeout=30)
        other = answer["choices"][0]["message"]["content"].casefold()
        assert status == 200 and "buen" not in other and "servicio" not in other, other
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=10) == 0


def test_serve_help_is_fast_and_imports_no_ml_stack():
    probe = (
        "import sys; sys.argv = ['adapterctl', 'serve', '--help']\n"
        "from adapterctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'transformers', 'peft', 'mlx', 'numpy', 'safetensors'}\n"
        "print('LOADED=' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    argv = [sys.executable, "-c", probe]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60)
    assert "--adapter-dir" in proc.stdout and "--backend" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED="
