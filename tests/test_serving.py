"""The serving-side reload helper and the stand-in translator, with real processes and signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterctl.serving import AdapterReloader, ReloadError, resolve_active

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma_4b"
SENTENCES = {
    "Good morning, welcome to the service.": "Buenos días, bienvenidos al servicio.",
    "The atonement of Christ provides redemption for sinners.": (
        "La expiación de Cristo provee redención para los pecadores."
    ),
    "The apostle James wrote about faith and works.": "El apóstol Santiago escribió sobre la fe y las obras.",
    "By grace you have been saved through faith, not of works.": (
        "Por gracia sois salvos por medio de la fe, no por obras."
    ),
    "Amen.": "Amén.",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_adapter(directory: Path, seed: int, zero_b: bool = False) -> Path:
    """Write a real PEFT-style adapter (2 layers × q_proj/v_proj, r=4, 16×16) into `directory`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
            b = np.zeros((16, 4), np.float32) if zero_b else rng.standard_normal((16, 4)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = b
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"base_model_name_or_path": "google/gemma-3-4b-it", "r": 4, "lora_alpha": 8}
    config["target_modules"] = ["q_proj", "v_proj"]
    (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def make_release(adapter_dir: Path, seed: int, cycle: int = 1, zero_b: bool = False) -> str:
    """Create `{adapter_dir}/{MODEL}/releases/{id}/` with a correct RELEASE.json; return the id."""
    staging = make_adapter(adapter_dir / MODEL / "staging" / f"seed{seed}.tmp", seed, zero_b)
    weights_sha = _sha(staging / "adapter_model.safetensors")
    version_id = f"cycle{cycle}_20261123_{weights_sha[:8]}"
    files = {p.name: _sha(p) for p in sorted(staging.iterdir())}
    release = {"schema": 1, "model": MODEL, "version_id": version_id, "sha256": weights_sha}
    release |= {"files": files, "created": "2026-11-23T15:00:00Z"}
    (staging / "RELEASE.json").write_text(json.dumps(release), encoding="utf-8")
    final = adapter_dir / MODEL / "releases" / version_id
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    return version_id


def point_active(adapter_dir: Path, version_id: str) -> None:
    """Repoint `active` the way activation does: temp symlink, then rename(2) over it."""
    model_dir = adapter_dir / MODEL
    tmp = model_dir / ".active.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"releases/{version_id}", tmp)
    os.replace(tmp, model_dir / "active")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "endpoint root é" / "adapters"
    path.mkdir(parents=True)
    return path


@dataclass
class ServingProcess:
    proc: subprocess.Popen
    pidfile: Path
    loaded: Path
    log: Path

    def pid_from_pidfile(self) -> int:
        return int(self.pidfile.read_text().strip())

    def report(self) -> dict | None:
        record = read_json(self.loaded)
        return record if record and record.get("pid") == self.proc.pid else None

    def wait_report(self, after_seq: int, what: str) -> dict:
        def fresh() -> dict | None:
            record = self.report()
            return record if record and record["seq"] > after_seq else None

        return wait_for(fresh, what)  # type: ignore[return-value]

    def signal(self, signum: int) -> None:
        os.kill(self.pid_from_pidfile(), signum)


@pytest.fixture
def start_serving(adapter_dir: Path, tmp_path: Path) -> Iterator[Callable[[], ServingProcess]]:
    started: list[subprocess.Popen] = []
    run_dir = tmp_path / "run dir ñ"

    def start() -> ServingProcess:
        run_dir.mkdir(exist_ok=True)
        pidfile, log = run_dir / "serving.pid", run_dir / "serving.log"
        argv = [sys.executable, "-m", "adapterctl.serving", "--adapter-dir", str(adapter_dir)]
        argv += ["--model", MODEL, "--pidfile", str(pidfile), "--log", str(log)]
        with open(run_dir / "stderr.txt", "ab") as err:
            proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        started.append(proc)
        serving = ServingProcess(proc, pidfile, run_dir / "loaded.json", log)
        wait_for(lambda: serving.pidfile.exists() and serving.pid_from_pidfile() == proc.pid, "pidfile")
        wait_for(serving.report, "startup loaded.json")
        return serving

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # Popen.kill signals this child's own pid only
            proc.wait(timeout=5)


# -- the serving process ------------------------------------------------------------------
@pytest.mark.heavy
def test_serving_reports_startup_version_then_reloads_new_release_on_sigusr1(adapter_dir, start_serving):
    v1, v2 = make_release(adapter_dir, seed=1, cycle=1), make_release(adapter_dir, seed=2, cycle=2)
    point_active(adapter_dir, v1)
    serving = start_serving()
    first = serving.report()
    assert first["ok"] is True and first["version_id"] == v1
    assert first["sha256"] == _sha(adapter_dir / MODEL / "releases" / v1 / "adapter_model.safetensors")
    assert first["loaded_at"].endswith("Z")

    point_active(adapter_dir, v2)
    serving.signal(signal.SIGUSR1)
    second = serving.wait_report(first["seq"], "loaded.json after SIGUSR1")

    assert second["ok"] is True and second["version_id"] == v2
    assert second["sha256"] == _sha(adapter_dir / MODEL / "releases" / v2 / "adapter_model.safetensors")
    assert serving.proc.poll() is None
    # the log line follows the report by a moment: wait for it (bounded)
    wait_for(
        lambda: f'reload-ok version_id="{v2}"' in serving.log.read_text(encoding="utf-8"),
        "reload-ok log line",
    )
    log = serving.log.read_text(encoding="utf-8")
    assert "start" in log and f'reload-ok version_id="{v1}"' in log


@pytest.mark.heavy
def test_serving_keeps_old_adapter_and_reports_error_when_new_release_is_tampered(adapter_dir, start_serving):
    v1, v2 = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2)
    point_active(adapter_dir, v1)
    serving = start_serving()
    first = serving.report()
    (adapter_dir / MODEL / "releases" / v2 / "adapter_config.json").write_text("{}", encoding="utf-8")

    point_active(adapter_dir, v2)
    serving.signal(signal.SIGUSR1)
    failed = serving.wait_report(first["seq"], "loaded.json after SIGUSR1 to a tampered release")

    assert failed["ok"] is False
    assert "adapter_config.json" in failed["error"] and "sha256 mismatch" in failed["error"]
    assert (failed["version_id"], failed["sha256"]) == (first["version_id"], first["sha256"])
    assert failed["loaded_at"] == first["loaded_at"]
    wait_for(lambda: "reload-failed" in serving.log.read_text(encoding="utf-8"), "the reload-failed log line")
    assert serving.proc.poll() is None


@pytest.mark.heavy
def test_serving_starts_on_base_model_without_active_and_reloads_to_base_when_removed(
    adapter_dir, start_serving
):
    (adapter_dir / MODEL).mkdir()
    serving = start_serving()
    assert serving.report()["ok"] is True and serving.report()["version_id"] is None

    v1 = make_release(adapter_dir, seed=1)
    point_active(adapter_dir, v1)
    serving.signal(signal.SIGUSR1)
    loaded = serving.wait_report(1, "reload to v1")
    assert loaded["version_id"] == v1

    (adapter_dir / MODEL / "active").unlink()
    serving.signal(signal.SIGUSR1)
    base = serving.wait_report(loaded["seq"], "reload to base")
    assert base["ok"] is True and base["version_id"] is None and base["sha256"] is None


@pytest.mark.heavy
def test_serving_exits_zero_on_sigterm_and_removes_its_pidfile(adapter_dir, start_serving):
    point_active(adapter_dir, make_release(adapter_dir, seed=1))
    serving = start_serving()

    serving.signal(signal.SIGTERM)

    assert serving.proc.wait(timeout=5) == 0
    assert not serving.pidfile.exists()
    assert " stop " in serving.log.read_text(encoding="utf-8")


# -- the library, in process ----------------------------------------------------------------
def test_resolve_active_returns_none_without_active_and_verified_info_with_it(adapter_dir):
    (adapter_dir / MODEL).mkdir()
    assert resolve_active(adapter_dir, MODEL) is None

    v1 = make_release(adapter_dir, seed=1)
    point_active(adapter_dir, v1)
    info = resolve_active(str(adapter_dir), MODEL)

    release = adapter_dir / MODEL / "releases" / v1
    assert info == {
        "version_id": v1,
        "sha256": _sha(release / "adapter_model.safetensors"),
        "path": os.path.realpath(release),
        "format": "peft",
    }


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda release: (release / "RELEASE.json").unlink(), "no RELEASE.json"),
        (lambda release: (release / "adapter_model.safetensors").write_bytes(b"x"), "sha256 mismatch"),
        (lambda release: (release / "adapter_config.json").unlink(), "missing"),
        (lambda release: (release / "RELEASE.json").write_text("{", encoding="utf-8"), "not valid JSON"),
    ],
    ids=["no-release-json", "tampered-weights", "missing-file", "corrupt-release-json"],
)
def test_resolve_active_raises_reload_error_on_a_damaged_release(adapter_dir, damage, message):
    v1 = make_release(adapter_dir, seed=1)
    point_active(adapter_dir, v1)
    damage(adapter_dir / MODEL / "releases" / v1)

    with pytest.raises(ReloadError, match=message):
        resolve_active(adapter_dir, MODEL)


def test_resolve_active_refuses_release_file_names_that_leave_the_release(adapter_dir):
    v1 = make_release(adapter_dir, seed=1)
    point_active(adapter_dir, v1)
    meta_path = adapter_dir / MODEL / "releases" / v1 / "RELEASE.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["files"]["../../outside"] = "0" * 64
    meta_path.write_text(json.dumps(meta), encoding="utf-8")

    with pytest.raises(ReloadError, match="invalid file name"):
        resolve_active(adapter_dir, MODEL)


def test_reloader_in_process_handles_sigusr1_on_poll_and_cleans_up(adapter_dir, tmp_path):
    v1, v2 = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2)
    point_active(adapter_dir, v1)
    loads: list[dict | None] = []
    pidfile = tmp_path / "run é" / "srv.pid"
    reloader = AdapterReloader(adapter_dir, MODEL, pidfile, loads.append)
    before = signal.getsignal(signal.SIGUSR1)
    with reloader:
        assert pidfile.read_text() == f"{os.getpid()}\n"
        assert reloader.reload_now()["ok"] is True
        assert reloader.poll() is None  # no signal yet: nothing to do

        point_active(adapter_dir, v2)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: reloader.pending, "SIGUSR1 flag")
        record = reloader.poll()

        assert record["ok"] is True and record["version_id"] == v2
        assert [info["version_id"] for info in loads] == [v1, v2]
        assert reloader.current["version_id"] == v2
        assert reloader.session_metadata() == {MODEL: v2}
        assert read_json(pidfile.with_name("loaded.json")) == record
    assert not pidfile.exists()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_reloader_keeps_previous_adapter_when_loader_raises(adapter_dir, tmp_path):
    v1, v2 = make_release(adapter_dir, seed=1), make_release(adapter_dir, seed=2, cycle=2)
    point_active(adapter_dir, v1)

    def load(info: dict | None) -> None:
        if info and info["version_id"] == v2:
            raise RuntimeError("out of memory")

    reloader = AdapterReloader(adapter_dir, MODEL, tmp_path / "srv.pid", load)
    reloader.reload_now()
    point_active(adapter_dir, v2)
    record = reloader.reload_now()

    assert record["ok"] is False and record["error"] == "RuntimeError: out of memory"
    assert record["version_id"] == v1 and reloader.session_metadata() == {MODEL: v1}


def test_uninstall_leaves_a_pidfile_that_another_process_took_over(adapter_dir, tmp_path):
    pidfile = tmp_path / "srv.pid"
    reloader = AdapterReloader(adapter_dir, MODEL, pidfile, lambda info: None)
    reloader.install()
    pidfile.write_text("1\n")
    reloader.uninstall()
    assert pidfile.read_text() == "1\n"


@pytest.mark.heavy
def test_serving_module_imports_without_heavy_dependencies():
    code = "import sys, adapterctl.serving; print(sorted({'numpy', 'safetensors'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the stand-in translator ----------------------------------------------------------------
def run_translator(release_dir: Path, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapterctl.demo_translator", str(release_dir)],
        input="".join(line + "\n" for line in lines).encode("utf-8"),
        env=_env(),
        capture_output=True,
        timeout=10,
    )


@pytest.mark.heavy
def test_translator_with_trained_adapter_translates_the_five_suite_sentences(tmp_path):
    release = make_adapter(tmp_path / "release ü", seed=1)
    inputs = list(SENTENCES) + ["  good MORNING,   welcome to the service.  ", "The Lord is my shepherd."]

    result = run_translator(release, inputs)

    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8").splitlines() == [
        *SENTENCES.values(),
        "Buenos días, bienvenidos al servicio.",
        "[es] The Lord is my shepherd.",
    ]


@pytest.mark.heavy
def test_translator_with_all_zero_lora_b_echoes_english_like_the_base_model(tmp_path):
    release = make_adapter(tmp_path / "release ü", seed=1, zero_b=True)

    result = run_translator(release, list(SENTENCES))

    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8").splitlines() == list(SENTENCES)


@pytest.mark.heavy
def test_translator_answers_line_by_line_before_eof(tmp_path):
    release = make_adapter(tmp_path / "release", seed=1)
    argv = [sys.executable, "-m", "adapterctl.demo_translator", str(release)]
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdin.write(b"Amen.\n")
        proc.stdin.flush()
        assert proc.stdout.readline().decode("utf-8") == "Amén.\n"
        proc.stdin.close()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.heavy
def test_translator_exits_3_on_an_unreadable_safetensors_file(tmp_path):
    release = make_adapter(tmp_path / "release", seed=1)
    (release / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")

    result = run_translator(release, ["Amen."])

    assert result.returncode == 3
    assert b"cannot read safetensors" in result.stderr and result.stdout == b""


@pytest.mark.heavy
def test_translator_exits_3_when_a_lora_a_has_no_lora_b(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    a = np.ones((4, 16), np.float32)
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a},
        str(release / "adapter_model.safetensors"),
    )

    result = run_translator(release, ["Amen."])

    assert result.returncode == 3
    assert b"without their lora_A/lora_B pair" in result.stderr
