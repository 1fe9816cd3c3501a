"""Shared fixtures: a real workspace with local endpoints, real adapters and the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapterctl.demo import make_adapter, start_serving_standin, stop_process

MODEL = "gemma_4b"
TRANSLATOR = [sys.executable, "-m", "adapterctl.demo_translator", "{release}"]


@dataclass
class Workspace:
    """A training box + two local endpoints under a path with spaces and non-ASCII characters."""

    root: Path
    config: Path
    store: Path
    sources: dict[str, Path]
    endpoints: dict[str, Path]  # name -> adapter_dir
    servers: list[subprocess.Popen] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the CLI (e.g. SSH test hosts)

    def cli_env(self) -> dict[str, str]:
        return dict(os.environ, **self.env, ADAPTERCTL_CONFIG=str(self.config), COLUMNS="200")

    def popen(self, *args: str) -> subprocess.Popen:
        """Start the real CLI without waiting (to run several at once); text pipes."""
        return subprocess.Popen(
            [sys.executable, "-m", "adapterctl", *args],
            env=self.cli_env(),
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(self, *args: str, check: int | None = None) -> subprocess.CompletedProcess:
        """Run the real `adapterctl` CLI; assert the exit code when `check` is given."""
        env = self.cli_env()
        proc = subprocess.run(
            [sys.executable, "-m", "adapterctl", *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check is not None:
            assert proc.returncode == check, (
                f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
            )
        return proc

    def cli_faulted(self, fault: str, *args: str, check: int | None = None) -> subprocess.CompletedProcess:
        """Run the CLI with the executor's test hook ADAPTERCTL_FAULT=`fault` (see adapterctl/faults.py)."""
        self.env["ADAPTERCTL_FAULT"] = fault
        try:
            return self.cli(*args, check=check)
        finally:
            del self.env["ADAPTERCTL_FAULT"]

    def cli_json(self, *args: str, check: int | None = None) -> dict | list:
        return json.loads(self.cli(*args, "--json", check=check).stdout)

    def new_adapter(self, model: str, run: str, seed: int, **kw) -> Path:
        """Write a new training run under the model's source; it becomes the newest one."""
        path = self.sources[model] / run
        make_adapter(path, seed=seed, **kw)
        newest = max((p / "adapter_model.safetensors").stat().st_mtime for p in self.sources[model].iterdir())
        os.utime(path / "adapter_model.safetensors", (newest + 1, newest + 1))
        return path

    def active(self, endpoint: str, model: str = MODEL) -> str | None:
        link = self.endpoints[endpoint] / model / "active"
        return os.readlink(link).rsplit("/", 1)[-1] if os.path.islink(link) else None

    def previous(self, endpoint: str, model: str = MODEL) -> str | None:
        link = self.endpoints[endpoint] / model / "previous"
        return os.readlink(link).rsplit("/", 1)[-1] if os.path.islink(link) else None

    def status_json(self, endpoint: str) -> dict:
        return json.loads((self.endpoints[endpoint] / "status.json").read_text())

    def log(self) -> list[dict]:
        path = self.store / "deploy_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def start_server(self, endpoint: str, model: str = MODEL) -> subprocess.Popen:
        """Start the serving stand-in for `endpoint` (its pidfile is run/serve.pid beside adapter_dir)."""
        proc = start_serving_standin(self.endpoints[endpoint], model, self.endpoints[endpoint].parent / "run")
        self.servers.append(proc)
        return proc

    def stop_servers(self) -> None:
        for proc in self.servers:
            stop_process(proc)


def assert_one_line_error(proc, *needles: str) -> None:
    """Exit 2, `error: ...` on one line (plus an optional `  → hint`), no traceback, nothing on stdout."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), proc.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  → ")), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every path, link target, mode and file content under root (except dirs named in `skip`)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode}|".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def write_config(
    ws_root: Path,
    *,
    mac_reload: str = "none",
    health_command: list[str] | None = None,
    extra_model: bool = False,
    keep: int = 5,
) -> Path:
    command = json.dumps(health_command or TRANSLATOR)
    pid = "    pidfile: ../run/serve.pid\n" if mac_reload == "sigusr1" else ""
    models = f"""\
  {MODEL}:
    source: "./training data/{MODEL}"
    base_model: local/tiny-llama
    convert: peft
    health:
      suite: translation_en_es
      engine: command
      command: {command}
      timeout_s: 20
"""
    if extra_model:
        models += """\
  whisper:
    source: "./training data/whisper"
    base_model: local/tiny-whisper
    convert: peft
"""
    for parent in ("mac dev é", "rtx-1 ü"):  # set up like a real endpoint: adapter_dir's parent exists
        (ws_root / "endpoints" / parent).mkdir(parents=True, exist_ok=True)
    cfg = ws_root / "adapterctl.yaml"
    cfg.write_text(
        f"""\
store: ./adapters
keep_releases: {keep}
endpoints:
  mac-dev:
    host: local
    adapter_dir: "./endpoints/mac dev é/adapters"
    kind: mlx
    reload_method: {mac_reload}
{pid}    reload_timeout_s: 10
    compat_links:
      fine_tuned_gemma_mi_A: {MODEL}
  rtx-1:
    host: local
    adapter_dir: "./endpoints/rtx-1 ü/adapters"
    kind: gguf
    reload_method: none
models:
{models}""",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture
def workspace(tmp_path: Path):
    """A fresh workspace with one cycle-1 adapter for gemma_4b (and whisper) in its source dir."""
    root = tmp_path / "wörk space"
    root.mkdir()
    cfg = write_config(root, extra_model=True)
    sources = {MODEL: root / "training data" / MODEL, "whisper": root / "training data" / "whisper"}
    ws = Workspace(
        root=root,
        config=cfg,
        store=root / "adapters",
        sources=sources,
        endpoints={
            "mac-dev": root / "endpoints" / "mac dev é" / "adapters",
            "rtx-1": root / "endpoints" / "rtx-1 ü" / "adapters",
        },
    )
    ws.new_adapter(MODEL, "run1", seed=1, metrics={"final_loss": 0.9})
    ws.new_adapter("whisper", "run1", seed=11, targets=("q_proj", "k_proj", "v_proj"))
    try:
        yield ws
    finally:
        ws.stop_servers()


SSH_HOST_SPECS = [("mac-1", True), ("linux-1", False), ("linux-2", False)]  # (alias, BSD-like userland)


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    """Three real sshd hosts on loopback (mac-1 emulates a Mac's BSD userland); see tests/sshhosts.py."""
    from sshhosts import SSHD, hosts_fixture_factory

    if not os.path.exists(SSHD):
        pytest.fail(
            f"{SSHD} is missing: install openssh-server and rsync (.ci/run does) to run the SSH tests"
        )
    yield from hosts_fixture_factory(tmp_path_factory, SSH_HOST_SPECS)
