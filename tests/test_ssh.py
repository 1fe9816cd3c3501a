"""End to end over real SSH: `adapterctl` against three sshd hosts on loopback (tests/sshhosts.py).

mac-1 emulates a Mac's BSD userland (no sha256sum, GNU-only flags rejected), linux-1 and linux-2
are plain Linux hosts. Every test gets its own adapter_dir on each host (the hosts are shared by
the whole session), and runs the real CLI with `--ssh-config` pointing at the hosts' config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import MODEL, TRANSLATOR, Workspace, tree_digest

HOSTS = ("mac-1", "linux-1", "linux-2")
KINDS = {"mac-1": "mlx", "linux-1": "gguf", "linux-2": "gguf"}
MODELS = (MODEL, "whisper")


# -- workspace -----------------------------------------------------------------------------------
class SSHWorkspace(Workspace):
    """A conftest Workspace whose endpoints are the SSH test hosts; every CLI call names the ssh_config."""

    ssh_config: Path
    hosts: object

    def cli(self, *args: str, check: int | None = None, ssh_config: Path | None = None, accept_new=False):
        pre = ["--ssh-config", str(ssh_config or self.ssh_config)]
        if accept_new:
            pre.append("--accept-new-host-keys")
        return super().cli(*pre, *args, check=check)

    def popen(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, **self.env, ADAPTERCTL_CONFIG=str(self.config), COLUMNS="200")
        return subprocess.Popen(
            [sys.executable, "-m", "adapterctl", "--ssh-config", str(self.ssh_config), *args],
            env=env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def ssh(self, alias: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.hosts.ssh_argv(alias, command),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    def manifest(self) -> dict:
        return json.loads((self.store / "manifest.json").read_text())

    def vid(self, cycle: int, model: str = MODEL) -> str:
        [v] = [v for v in self.manifest()["versions"][model] if v["cycle"] == cycle]
        return v["version_id"]

    def register(self, cycle: int, model: str = MODEL) -> str:
        return self.cli("register", "--model", model, "--cycle", str(cycle), check=0).stdout.strip()

    def model_dir(self, endpoint: str, model: str = MODEL) -> Path:
        return self.endpoints[endpoint] / model

    def staging(self, endpoint: str, version: str, model: str = MODEL) -> Path:
        return self.model_dir(endpoint, model) / "staging" / f"{version}.tmp"

    def release(self, endpoint: str, version: str, model: str = MODEL) -> Path:
        return self.model_dir(endpoint, model) / "releases" / version


def ssh_config_with_known_hosts(hosts, path: Path, known_hosts: Path) -> Path:
    """A copy of the hosts' ssh_config whose UserKnownHostsFile is `known_hosts` (ours to edit)."""
    text = hosts.ssh_config.read_text()
    old = str(hosts.known_hosts)
    assert old in text
    path.write_text(text.replace(old, str(known_hosts)))
    path.chmod(0o600)
    return path


def write_ssh_config(root: Path, dirs: dict[str, str], keep: int = 5) -> Path:
    endpoints = "".join(
        f"""\
  {name}:
    host: {name}
    adapter_dir: "{dirs[name]}"
    kind: {KINDS[name]}
    reload_method: none
"""
        for name in dirs
    )
    cfg = root / "adapterctl.yaml"
    cfg.write_text(
        f"""\
store: ./adapters
keep_releases: {keep}
endpoints:
{endpoints}models:
  {MODEL}:
    source: "./training data/{MODEL}"
    base_model: local/tiny-llama
    health:
      suite: translation_en_es
      engine: command
      command: {json.dumps(TRANSLATOR)}
      timeout_s: 30
  whisper:
    source: "./training data/whisper"
    base_model: local/tiny-whisper
""",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture
def ssh_workspace(workspace: Workspace, ssh_hosts):
    """The conftest workspace (gemma_4b and whisper run1 adapters), its endpoints the three SSH hosts.

    Each test gets fresh adapter_dirs `<host root>/t-<uuid>/adapters`; ws.endpoints maps each
    endpoint to that path (the hosts share this machine's filesystem, so tests can look directly).
    """
    tag = f"t-{uuid.uuid4().hex[:12]}"
    dirs = {alias: ssh_hosts.hosts[alias].root / tag / "adapters" for alias in HOSTS}
    ws = SSHWorkspace(
        root=workspace.root,
        config=write_ssh_config(workspace.root, {a: str(d) for a, d in dirs.items()}),
        store=workspace.store,
        sources=workspace.sources,
        endpoints=dirs,
        env=ssh_hosts.env(),
    )
    ws.ssh_config = ssh_hosts.ssh_config
    ws.hosts = ssh_hosts
    try:
        yield ws
    finally:
        for d in dirs.values():
            top = d.parent
            for dirpath, _dirs, files in os.walk(top):  # releases are read-only
                for f in files:
                    p = os.path.join(dirpath, f)
                    if not os.path.islink(p):
                        os.chmod(p, 0o644)
            shutil.rmtree(top, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------
def deploy_argv(cycle: int, endpoints=HOSTS, models=None) -> list[str]:
    which = ["--models", *models] if models else ["--all-adapters"]
    return ["deploy", "--cycle", str(cycle), *which, "--endpoints", *endpoints]


def deploy(ws: SSHWorkspace, cycle: int, *endpoints: str, models=None, extra=(), check=None, **kw):
    return ws.cli(*deploy_argv(cycle, endpoints or HOSTS, models), *extra, check=check, **kw)


def deploy_json(ws: SSHWorkspace, cycle: int, *endpoints: str, models=None, extra=(), check=None) -> dict:
    proc = deploy(ws, cycle, *endpoints, models=models, extra=(*extra, "--json"), check=check)
    return json.loads(proc.stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_ok(ws: SSHWorkspace, endpoint: str, version: str, model: str = MODEL) -> None:
    """releases/<version> holds exactly the manifest's files, with their hashes, and RELEASE.json."""
    rel = ws.release(endpoint, version, model)
    [entry] = [v for v in ws.manifest()["versions"][model] if v["version_id"] == version]
    meta = json.loads((rel / "RELEASE.json").read_text())
    assert meta["files"] == entry["files"]
    assert sorted(p.name for p in rel.iterdir()) == sorted([*entry["files"], "RELEASE.json"])
    for name, digest in entry["files"].items():
        assert sha256(rel / name) == digest, f"{endpoint}: {rel / name}"


def combined(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def outcomes(report: dict) -> dict[tuple[str, str], dict]:
    return {(o["endpoint"], o["model"]): o for o in report["outcomes"]}


# -- the fixture itself --------------------------------------------------------------------------
def test_mac_host_has_bsd_userland(ssh_workspace):
    """The premise of the Mac tests: mac-1 has no sha256sum and rejects GNU-only flags."""
    ws = ssh_workspace
    mac = ws.ssh("mac-1", "command -v sha256sum || echo none; uname -s")
    assert mac.returncode == 0 and mac.stdout.split() == ["none", "Darwin"], mac
    assert ws.ssh("mac-1", "mv -T a b").returncode != 0
    assert ws.ssh("linux-1", "command -v sha256sum").returncode == 0


# -- deploy, redeploy, delta -------------------------------------------------------------------------
def test_deploy_two_models_to_three_hosts_then_redeploy_sends_nothing_and_a_change_sends_one_adapter(
    ssh_workspace,
):
    ws = ssh_workspace
    # a bigger gemma adapter than whisper's, so "only that adapter" is visible in the byte counts
    ws.new_adapter(MODEL, "run1", seed=1, hidden=4096)
    report = deploy_json(ws, 1, check=0)
    v1 = {m: ws.vid(1, m) for m in MODELS}
    got = outcomes(report)
    assert sorted(got) == sorted((e, m) for e in HOSTS for m in MODELS)
    for (endpoint, model), o in got.items():
        assert o["status"] == "success", o
        assert o["version"] == v1[model]
        assert ws.active(endpoint, model) == v1[model]
        release_ok(ws, endpoint, v1[model], model)
        assert o["bytes_sent"] >= (ws.store / model / v1[model] / "adapter_model.safetensors").stat().st_size
        status = ws.status_json(endpoint)["models"][model]
        assert status["active_version"] == v1[model] and status["health_status"] == "healthy"
    # the health suite ran on every endpoint (through ssh) for gemma_4b and passed
    for endpoint in HOSTS:
        assert got[(endpoint, MODEL)]["health"]["pre_activation"]["all_passed"] is True
        assert got[(endpoint, MODEL)]["health"]["post_activation"]["all_passed"] is True

    # redeploy: nothing to send, nothing changes on any endpoint
    before = {e: tree_digest(ws.endpoints[e]) for e in HOSTS}
    again = deploy_json(ws, 1, check=0)
    assert again["bytes_to_send"] == 0
    assert all(o["bytes_sent"] == 0 for o in again["outcomes"]), again["outcomes"]
    assert not [s for s in again["steps"] if s["phase"] == "transfer"], again["steps"]
    assert {e: tree_digest(ws.endpoints[e]) for e in HOSTS} == before

    # change gemma_4b only: only its weights travel; whisper and gemma's config are untouched
    ws.new_adapter(MODEL, "run2", seed=2, hidden=4096)
    third = deploy_json(ws, 2, check=0)
    v2 = ws.vid(2)
    got = outcomes(third)
    assert sorted(got) == sorted((e, MODEL) for e in HOSTS), "whisper must not be redeployed"
    weights = (ws.store / MODEL / v2 / "adapter_model.safetensors").stat().st_size
    whisper_size = sum(p.stat().st_size for p in (ws.store / "whisper" / v1["whisper"]).iterdir())
    for endpoint in HOSTS:
        o = got[(endpoint, MODEL)]
        assert o["status"] == "success", o
        # (rsync's delta against the previous release may match the safetensors header)
        assert weights * 0.9 <= o["bytes_sent"] < weights + whisper_size, o
        assert ws.active(endpoint) == v2 and ws.previous(endpoint) == v1[MODEL]
        assert ws.active(endpoint, "whisper") == v1["whisper"]
        release_ok(ws, endpoint, v2)
        # the unchanged adapter_config.json was hard-linked from the previous release, not sent
        new_cfg = ws.release(endpoint, v2) / "adapter_config.json"
        old_cfg = ws.release(endpoint, v1[MODEL]) / "adapter_config.json"
        assert new_cfg.stat().st_ino == old_cfg.stat().st_ino
    log = [r for r in ws.log() if r.get("deployment_id") == third["deployment_id"]]
    assert {(r["endpoint"], r["model"]) for r in log if r["action"] == "deploy"} == set(got)


# -- remote hash verify ------------------------------------------------------------------------------
def test_flipped_byte_in_remote_staging_is_caught_by_the_remote_hash_verify(ssh_workspace):
    """A staged copy damaged after transfer (same size and mtime, so rsync's quick check keeps it)
    must be caught by the sha256 computed on the endpoint: nothing published, active unchanged."""
    ws = ssh_workspace
    eps = ("mac-1", "linux-1")
    deploy(ws, 1, *eps, check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=1024)
    v2 = ws.register(2)
    src = ws.store / MODEL / v2
    for endpoint in eps:
        staging = ws.staging(endpoint, v2)
        staging.mkdir(parents=True)
        for f in src.iterdir():
            shutil.copy2(f, staging / f.name)
        bad = staging / "adapter_model.safetensors"
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        st = (src / "adapter_model.safetensors").stat()
        os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = {e: tree_digest(ws.release(e, v1)) for e in eps}

    proc = deploy(ws, 2, *eps, models=[MODEL], check=1)
    text = combined(proc)
    assert "adapter_model.safetensors" in text and "does not match" in text, text
    for endpoint in eps:
        assert ws.active(endpoint) == v1
        assert ws.status_json(endpoint)["models"][MODEL]["active_version"] == v1
        assert not ws.release(endpoint, v2).exists()
        assert not (ws.staging(endpoint, v2) / "adapter_model.safetensors").exists()
        assert tree_digest(ws.release(endpoint, v1)) == before[endpoint]
        assert not (ws.endpoints[endpoint] / ".adapterctl.lock").exists()
    statuses = {r["endpoint"]: r["status"] for r in ws.log() if r.get("version") == v2}
    assert statuses == dict.fromkeys(eps, "failed")

    # the rerun sends the removed file again and publishes
    deploy(ws, 2, *eps, models=[MODEL], check=0)
    for endpoint in eps:
        assert ws.active(endpoint) == v2 and ws.previous(endpoint) == v1
        release_ok(ws, endpoint, v2)
        assert not ws.staging(endpoint, v2).exists()


# -- host keys ----------------------------------------------------------------------------------------
def fingerprint(pubkey: str) -> str:
    import base64

    blob = base64.b64decode(pubkey.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def test_unknown_and_changed_host_keys_are_refused_and_accept_new_records_only_unknown_ones(
    ssh_workspace, tmp_path
):
    ws = ssh_workspace
    host = ws.hosts.hosts["linux-1"]
    deploy(ws, 1, "linux-1", check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2)
    before = tree_digest(ws.endpoints["linux-1"])
    known = tmp_path / "known_hosts"
    cfg = ssh_config_with_known_hosts(ws.hosts, tmp_path / "ssh_config", known)

    # unknown key: refused with its fingerprint and the fix; nothing changed, nothing recorded
    known.write_text("")
    proc = deploy(ws, 2, "linux-1", ssh_config=cfg)
    text = combined(proc)
    assert proc.returncode == 1, text
    assert "unknown" in text and fingerprint(host.host_pubkey) in text, text
    assert "--accept-new-host-keys" in text, text
    assert tree_digest(ws.endpoints["linux-1"]) == before
    assert known.read_text() == ""

    # changed key (known_hosts has another host's key under this name): refused, with or without
    # --accept-new-host-keys
    other = ws.hosts.hosts["mac-1"].host_pubkey
    wrong = f"{host.known_hosts_name} {other}\n"
    for accept in (False, True):
        known.write_text(wrong)
        proc = deploy(ws, 2, "linux-1", ssh_config=cfg, accept_new=accept)
        text = combined(proc)
        assert proc.returncode == 1, text
        assert "CHANGED" in text and fingerprint(host.host_pubkey) in text, text
        assert tree_digest(ws.endpoints["linux-1"]) == before
        assert known.read_text() == wrong

    # unknown key + --accept-new-host-keys: accepted, recorded, deployed
    known.write_text("")
    deploy(ws, 2, "linux-1", ssh_config=cfg, accept_new=True, check=0)
    assert ws.active("linux-1") == ws.vid(2) and ws.previous("linux-1") == v1
    recorded = [line.split() for line in known.read_text().splitlines() if line.strip()]
    assert recorded and all(r == [host.known_hosts_name, *host.host_pubkey.split()] for r in recorded)
    # now known: a plain run (no flag) with the same known_hosts connects
    ws.cli("status", "--endpoints", "linux-1", ssh_config=cfg, check=0)


# -- canary -----------------------------------------------------------------------------------------------
def test_canary_failure_leaves_the_other_endpoints_untouched(ssh_workspace):
    ws = ssh_workspace
    deploy(ws, 1, models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, zero_b=True)  # a no-op adapter: fails the health suite
    before = {e: tree_digest(ws.endpoints[e]) for e in ("linux-1", "linux-2")}
    report = deploy_json(ws, 2, models=[MODEL], extra=("--canary", "mac-1"), check=4)
    got = outcomes(report)
    assert got[("mac-1", MODEL)]["status"] == "aborted"
    assert got[("linux-1", MODEL)]["status"] == "skipped"
    assert got[("linux-2", MODEL)]["status"] == "skipped"
    assert ws.active("mac-1") == v1
    assert {e: tree_digest(ws.endpoints[e]) for e in ("linux-1", "linux-2")} == before


# -- status --------------------------------------------------------------------------------------------------
def test_status_reads_live_state_over_ssh_and_flags_drift(ssh_workspace):
    ws = ssh_workspace
    deploy(ws, 1, "mac-1", "linux-2", check=0)
    v1 = {m: ws.vid(1, m) for m in MODELS}
    rows = json.loads(ws.cli("status", "--endpoints", "mac-1", "linux-2", "--json", check=0).stdout)
    assert {(r["endpoint"], r["model"]): (r["active"], r["drift"]) for r in rows} == {
        (e, m): (v1[m], []) for e in ("mac-1", "linux-2") for m in MODELS
    }
    # edit linux-2's status.json by hand: status must compare it with the live link
    path = ws.endpoints["linux-2"] / "status.json"
    doc = json.loads(path.read_text())
    doc["models"][MODEL]["active_version"] = "cycle9_20200101_deadbeef"
    path.write_text(json.dumps(doc))
    rows = json.loads(ws.cli("status", "--endpoints", "mac-1", "linux-2", "--json", check=0).stdout)
    drift = {(r["endpoint"], r["model"]): r["drift"] for r in rows}
    assert drift[("mac-1", MODEL)] == [] and drift[("linux-2", "whisper")] == []
    assert any("cycle9_20200101_deadbeef" in d and v1[MODEL] in d for d in drift[("linux-2", MODEL)]), drift
    table = ws.cli("status", "--endpoints", "linux-2", check=0).stdout
    assert "cycle9_20200101_deadbeef" in table, table
    # the live link moved by hand (no status.json change) is drift too
    link = ws.model_dir("mac-1") / "active"
    os.unlink(link)
    rows = json.loads(ws.cli("status", "--endpoints", "mac-1", "--json", check=0).stdout)
    [row] = [r for r in rows if r["model"] == MODEL]
    assert row["active"] is None and row["drift"], row


def test_status_of_an_unreachable_endpoint_exits_1(ssh_workspace, tmp_path):
    ws = ssh_workspace
    known = tmp_path / "known_hosts"
    known.write_text("")
    cfg = ssh_config_with_known_hosts(ws.hosts, tmp_path / "ssh_config", known)
    proc = ws.cli("status", "--endpoints", "linux-1", ssh_config=cfg)
    assert proc.returncode == 1 and "unknown" in proc.stderr, combined(proc)
