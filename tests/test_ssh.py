"""End to end over real SSH: `adapterctl` against three sshd hosts on loopback (tests/sshhosts.py).

mac-1 emulates a Mac's BSD userland (no sha256sum, GNU-only flags rejected), linux-1 and linux-2
are plain Linux hosts. Every test gets its own adapter_dir on each host (the hosts are shared by
the whole session), and runs the real CLI with `--ssh-config` pointing at the hosts' config.
"""

from __future__ import annotations

import contextlib
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

pytestmark = pytest.mark.heavy  # starts sshd hosts and runs the real CLI as a subprocess

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
        """The CLI started without waiting, in its own session (so a SIGKILL hits it alone)."""
        return subprocess.Popen(
            [sys.executable, "-m", "adapterctl", "--ssh-config", str(self.ssh_config), *args],
            env=self.cli_env(),
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
    convert: peft
    health:
      suite: translation_en_es
      engine: command
      command: {json.dumps(TRANSLATOR)}
      timeout_s: 30
  whisper:
    source: "./training data/whisper"
    base_model: local/tiny-whisper
    convert: peft
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
    for d in dirs.values():  # set up like a real endpoint: adapter_dir's parent exists (it is never created)
        d.parent.mkdir(parents=True, exist_ok=True)
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
            shutil.rmtree(d.parent, ignore_errors=True)
        for dirpath, _dirs, files in os.walk(ws.root):  # pytest keeps tmp dirs: drop big copies
            for name in files:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_size > 16 * 1024 * 1024:
                        os.unlink(path)


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
def test_flipped_byte_in_remote_staging_is_never_published_the_rerun_sends_it_fresh(ssh_workspace):
    """A staged copy damaged after transfer (same size and mtime, so rsync's quick check would keep it)
    is caught by the sha256 computed on the endpoint before it is adopted: sent again, never published."""
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

    # staged files are adopted only after their sha256 is checked there: the damaged one is sent again
    report = deploy_json(ws, 2, *eps, models=[MODEL], check=0)
    size = (src / "adapter_model.safetensors").stat().st_size
    for endpoint in eps:
        assert outcomes(report)[(endpoint, MODEL)]["bytes_sent"] >= size
        assert tree_digest(ws.release(endpoint, v1)) == before[endpoint]
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


# -- failures on the endpoint ----------------------------------------------------------------------------
def test_staging_that_cannot_be_created_fails_clearly_and_leaves_active_untouched(ssh_workspace):
    """Root ignores permissions, so make mkdir fail another way: a file where staging/ must be."""
    ws = ssh_workspace
    deploy(ws, 1, "linux-1", models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2)
    blocker = ws.model_dir("linux-1") / "staging"
    if blocker.is_dir():
        blocker.rmdir()  # left empty by the first deploy
    blocker.write_text("not a directory\n")
    before = tree_digest(ws.endpoints["linux-1"], skip=(".adapterctl",))
    proc = deploy(ws, 2, "linux-1", models=[MODEL])
    text = combined(proc)
    assert proc.returncode == 1, text
    assert str(blocker) in text and ("File exists" in text or "Not a directory" in text), text
    assert ws.active("linux-1") == v1
    # nothing left behind, lock released; the journal records the aborted transaction
    assert tree_digest(ws.endpoints["linux-1"], skip=(".adapterctl",)) == before
    blocker.unlink()
    deploy(ws, 2, "linux-1", models=[MODEL], check=0)
    assert ws.active("linux-1") == ws.vid(2)


@pytest.fixture
def tmpfs(ssh_workspace):
    """mount(dir, size) a tmpfs (we are root); skips when this machine does not permit mounts."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, *opts: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): no small filesystem to fill")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_deploy_bigger_than_the_remote_free_space_is_refused_before_any_transfer(ssh_workspace, tmpfs):
    ws = ssh_workspace
    tmpfs(ws.endpoints["linux-2"], "1m")
    deploy(ws, 1, "linux-2", models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=16384)  # 2 MiB of weights on a 1 MiB disk
    before = tree_digest(ws.endpoints["linux-2"])
    proc = deploy(ws, 2, "linux-2", models=[MODEL])
    assert proc.returncode == 2, combined(proc)
    assert re.search(r"has [\d.]+ [KM]iB free, this deploy writes [\d.]+ MiB", proc.stderr), proc.stderr
    assert "refusing before any transfer" in proc.stderr
    assert ws.active("linux-2") == v1
    assert tree_digest(ws.endpoints["linux-2"]) == before


def test_remote_disk_full_mid_transfer_fails_clearly_cleans_staging_and_keeps_active(ssh_workspace, tmpfs):
    """The space check passed, then the disk filled (another writer): the transfer fails clearly."""
    ws = ssh_workspace
    adapter_dir = tmpfs(ws.endpoints["linux-2"], "1m")
    deploy(ws, 1, "linux-2", models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2, hidden=16384)  # 2 MiB of weights on a 1 MiB disk
    before = tree_digest(ws.release("linux-2", v1))
    # test hook: as if the space went after planning
    proc = ws.cli_faulted("no-space-check", *deploy_argv(2, ("linux-2",), [MODEL]))
    text = combined(proc)
    assert proc.returncode == 1, text
    assert "No space left" in text and "disk is full" in text, text
    v2 = ws.vid(2)
    assert ws.active("linux-2") == v1
    assert tree_digest(ws.release("linux-2", v1)) == before
    assert not ws.release("linux-2", v2).exists()
    assert not ws.staging("linux-2", v2).exists()
    assert os.listdir(ws.model_dir("linux-2") / "staging") == []
    assert not (adapter_dir / ".adapterctl.lock").exists()
    st = os.statvfs(adapter_dir)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize < 256 * 1024, "the partial transfer was not removed"
    deploy(ws, 2, "linux-2", models=[MODEL], check=2)  # and the next run refuses it up front


# -- doctor ------------------------------------------------------------------------------------------------
def test_doctor_all_ok_exits_0(ssh_workspace):
    ws = ssh_workspace
    proc = ws.cli("doctor", "--endpoints", "all", check=0)
    assert "adapterctl doctor" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
    checks = json.loads(ws.cli("doctor", "--endpoints", "all", "--json", check=0).stdout)
    assert {c["endpoint"] for c in checks} - {"local"} == set(HOSTS)
    assert all(c["result"] == "ok" for c in checks), [c for c in checks if c["result"] != "ok"]
    [mac_sha] = [c for c in checks if c["endpoint"] == "mac-1" and c["name"] == "sha256 tool"]
    assert "sha256sum" not in mac_sha["detail"], mac_sha


def test_doctor_prints_a_fix_for_each_failure_and_exits_1(ssh_workspace, tmpfs, tmp_path):
    ws = ssh_workspace
    # linux-2: adapter_dir does not exist and its parent is on a read-only filesystem
    ro = tmpfs(ws.endpoints["linux-2"].parent / "ro", "64k", "ro")
    bad_dir = ro / "sub" / "adapters"
    write_ssh_config(ws.root, {**{a: str(ws.endpoints[a]) for a in HOSTS}, "linux-2": str(bad_dir)})
    # mac-1: its host key is unknown (known_hosts holds only the linux hosts' keys)
    known = tmp_path / "known_hosts"
    known.write_text(
        "".join(
            f"{ws.hosts.hosts[a].known_hosts_name} {ws.hosts.hosts[a].host_pubkey}\n"
            for a in ("linux-1", "linux-2")
        )
    )
    cfg = ssh_config_with_known_hosts(ws.hosts, tmp_path / "ssh_config", known)

    proc = ws.cli("doctor", "--endpoints", "all", ssh_config=cfg)
    assert proc.returncode == 1, combined(proc)
    assert "adapterctl doctor" in proc.stdout and "FAIL" in proc.stdout and "fix" in proc.stdout
    checks = json.loads(ws.cli("doctor", "--endpoints", "all", "--json", ssh_config=cfg, check=1).stdout)
    failed = {(c["endpoint"], c["name"]): c for c in checks if c["result"] == "FAIL"}
    assert set(failed) == {("mac-1", "ssh login + host key"), ("linux-2", "adapter_dir writable")}, checks
    assert all(c["fix"].strip() for c in failed.values()), failed
    assert "--accept-new-host-keys" in failed[("mac-1", "ssh login + host key")]["fix"]
    assert str(bad_dir) in failed[("linux-2", "adapter_dir writable")]["fix"]
    assert all(c["result"] == "ok" for c in checks if c["endpoint"] == "linux-1")
    assert known.read_text().count("\n") == 2  # doctor never records a key by itself


def test_doctor_fails_an_adapter_dir_that_cannot_be_created(ssh_workspace):
    """As root every existing path is 'writable'; a regular file where a parent directory must be
    still makes the adapter_dir impossible to create, and doctor must say so (deploy would fail)."""
    ws = ssh_workspace
    parent = ws.endpoints["linux-1"].parent
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "not-a-dir").write_text("a file where a directory is needed\n")
    bad_dir = parent / "not-a-dir" / "adapters"
    write_ssh_config(ws.root, {"linux-1": str(bad_dir)})
    checks = json.loads(ws.cli("doctor", "--endpoints", "linux-1", "--json").stdout)
    failed = [c for c in checks if c["result"] == "FAIL"]
    assert [c["name"].split()[0] for c in failed] == ["adapter_dir"], checks
    assert failed[0]["fix"].strip()
    ws.cli("doctor", "--endpoints", "linux-1", check=1)
    # (what a deploy would run into)
    proc = deploy(ws, 1, "linux-1", models=[MODEL])
    assert proc.returncode == 1 and "not a directory" in combined(proc).lower(), combined(proc)


# -- concurrency and interruption (a big adapter, so a transfer takes a while) --------------------------
@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory):
    """A valid LoRA adapter of 128 MiB (8 layers x q/v x r=16 x hidden 65536, float32), made once."""
    from adapterctl.demo import make_adapter

    root = tmp_path_factory.mktemp("big")
    yield make_adapter(root / "adapter", seed=7, layers=8, hidden=65536, r=16)
    shutil.rmtree(root, ignore_errors=True)


def add_big_adapter(ws: SSHWorkspace, big: Path, run: str) -> Path:
    """Hard-link the big adapter in as the newest training run of gemma_4b."""
    dest = ws.sources[MODEL] / run
    dest.mkdir()
    for f in big.iterdir():
        os.link(f, dest / f.name)
    newest = max((p / "adapter_model.safetensors").stat().st_mtime for p in ws.sources[MODEL].iterdir())
    os.utime(dest / "adapter_model.safetensors", (newest + 1, newest + 1))
    return dest


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the CLI exited ({proc.returncode}) before {what}\nSTDOUT:\n{out}\nSTDERR:\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_two_deploys_at_once_one_proceeds_the_other_exits_3_naming_the_holder(ssh_workspace, big_adapter):
    ws = ssh_workspace
    add_big_adapter(ws, big_adapter, "run2")
    argv = deploy_argv(1, ("linux-2",), [MODEL])
    lock = ws.endpoints["linux-2"] / ".adapterctl.lock"
    plan = json.loads(ws.cli(*argv, "--dry-run", "--json", check=0).stdout)
    transfer = next(i for i, s in enumerate(plan["steps"]) if s["action"] == "transfer")
    gate = ws.root / "gate"
    ws.env["ADAPTERCTL_FAULT"] = f"pause:{transfer}:before:{gate}"  # the first holds the lock until told
    first = ws.popen(*argv)
    del ws.env["ADAPTERCTL_FAULT"]
    try:
        wait_for("it took the endpoint lock", Path(f"{gate}.reached").exists, first)
        assert lock.exists()
        second = ws.cli(*argv)
        gate.touch()
        text = combined(second)
        assert second.returncode == 3, text
        assert "locked by" in text and f"pid {first.pid}" in text, text
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{err}"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    v1 = ws.vid(1)
    assert ws.active("linux-2") == v1
    release_ok(ws, "linux-2", v1)
    assert not lock.exists()
    statuses = sorted(r["status"] for r in ws.log() if r.get("action") == "deploy")
    assert statuses == ["locked", "success"], statuses


class ActiveWatcher(threading.Thread):
    """Checks, as often as it can, that `active` resolves to a complete release (has RELEASE.json)."""

    def __init__(self, link: Path):
        super().__init__(daemon=True)
        self.link, self.stop, self.checks, self.bad, self.seen = link, threading.Event(), 0, [], set()

    def run(self) -> None:
        while not self.stop.is_set():
            self.checks += 1
            try:
                target = os.readlink(self.link)
            except OSError as exc:
                self.bad.append(f"active unreadable: {exc}")
            else:
                if not (self.link.parent / target / "RELEASE.json").is_file():
                    self.bad.append(f"active -> {target}, which is not a complete release")
                self.seen.add(target.rsplit("/", 1)[-1])
            time.sleep(0.002)


def staged_bytes(staging_root: Path) -> int:
    """Bytes of adapter_model.safetensors under staging/ so far (final, temporary or partial names)."""
    total = 0
    for dirpath, _dirs, files in os.walk(staging_root):
        for name in files:
            if "adapter_model.safetensors" in name:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def test_sigkill_during_transfer_then_rerun_finishes_and_active_is_always_valid(ssh_workspace, big_adapter):
    ws = ssh_workspace
    deploy(ws, 1, "linux-1", models=[MODEL], check=0)
    v1 = ws.vid(1)
    add_big_adapter(ws, big_adapter, "run2")
    argv = deploy_argv(2, ("linux-1",), [MODEL])
    watcher = ActiveWatcher(ws.model_dir("linux-1") / "active")
    watcher.start()
    try:
        cli = ws.popen(*argv)
        try:
            wait_for(
                "the transfer was under way",
                lambda: staged_bytes(ws.model_dir("linux-1") / "staging") > 8 * 1024 * 1024,
                cli,
            )
            os.kill(cli.pid, signal.SIGKILL)  # what `kill -9 <adapterctl pid>` does: the CLI only
        finally:
            if cli.poll() is None:
                cli.kill()
            cli.communicate()
        v2 = ws.vid(2)
        assert cli.returncode == -signal.SIGKILL
        assert not ws.release("linux-1", v2).exists(), "killed too late: the transfer had finished"
        assert ws.active("linux-1") == v1
        held = json.loads((ws.endpoints["linux-1"] / ".adapterctl.lock").read_text())
        assert held["pid"] == cli.pid
        # the transfer died with the CLI: no rsync (local or remote) still writes the staging dir
        staging = str(ws.staging("linux-1", v2))
        deadline = time.monotonic() + 10
        while writers := processes_naming(staging):
            assert time.monotonic() < deadline, f"writers outlived the killed CLI: {writers}"
            time.sleep(0.05)

        rerun = ws.cli(*argv)
        text = combined(rerun)
        assert rerun.returncode == 0, text
        assert "breaking the lock" in text, text
    finally:
        watcher.stop.set()
        watcher.join()
    assert ws.active("linux-1") == v2 and ws.previous("linux-1") == v1
    release_ok(ws, "linux-1", v2)
    assert not ws.staging("linux-1", v2).exists()
    assert not (ws.endpoints["linux-1"] / ".adapterctl.lock").exists()
    assert watcher.bad == [] and watcher.checks > 100, (watcher.checks, watcher.bad[:5])
    assert watcher.seen == {v1, v2}
    assert [r["broken_holder"]["pid"] for r in ws.log() if r.get("action") == "break_lock"] == [cli.pid]


def test_proxyjump_from_ssh_config_reaches_a_host_through_another(ssh_workspace, tmp_path):
    """linux-2 reached only through linux-1 (ProxyJump): paramiko's ops and rsync both take the hop."""
    ws = ssh_workspace
    target = ws.hosts.hosts["linux-2"]
    cfg = tmp_path / "ssh_config_jump"
    cfg.write_text(
        ws.hosts.ssh_config.read_text()
        + f"""
Host l2-via-l1
    HostName {target.address}
    Port {target.port}
    User root
    IdentityFile {target.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {ws.hosts.known_hosts}
    StrictHostKeyChecking yes
    ProxyJump linux-1
"""
    )
    cfg.chmod(0o600)
    yaml = ws.config.read_text().replace("    host: linux-2\n", "    host: l2-via-l1\n")
    assert "l2-via-l1" in yaml
    ws.config.write_text(yaml)
    # the hop is really taken: through a jump host that does not answer, nothing is reachable
    broken = tmp_path / "ssh_config_broken_jump"
    broken.write_text(cfg.read_text().replace("ProxyJump linux-1", "ProxyJump root@127.0.0.1:1"))
    broken.chmod(0o600)
    failed = deploy(ws, 1, "linux-2", ssh_config=broken)
    assert failed.returncode == 1 and "jump" in combined(failed).lower(), combined(failed)
    assert not ws.endpoints["linux-2"].exists()
    proc = deploy(ws, 1, "linux-2", check=0, ssh_config=cfg)
    assert "success" in proc.stdout
    release_ok(ws, "linux-2", ws.vid(1))
    assert ws.active("linux-2") == ws.vid(1)


def test_reference_server_on_an_ssh_host_reports_each_deploy_and_keeps_serving_on_abort(
    ssh_workspace, tmp_path
):
    """`adapterctl serve` behind mac-1 (sigusr1): good → /health reports the new sha; bad → aborted,
    the old adapter still served."""
    from test_serve import start_server

    from adapterctl.demo import stop_process

    ws = ssh_workspace
    run = ws.endpoints["mac-1"].parent / "run"
    run.mkdir(parents=True, exist_ok=True)
    text = ws.config.read_text()
    block = f'    adapter_dir: "{ws.endpoints["mac-1"]}"\n    kind: mlx\n    reload_method: none\n'
    assert block in text
    ws.config.write_text(
        text.replace(
            block,
            block.replace(
                "reload_method: none\n", f'reload_method: sigusr1\n    pidfile: "{run / "serve.pid"}"\n'
            ),
        )
    )
    ws.endpoints["mac-1"].mkdir(parents=True, exist_ok=True)
    served = start_server(ws.endpoints["mac-1"], run)  # pidfile run/serve.pid, as configured above
    health = served.health
    try:
        deploy(ws, 1, "mac-1", models=[MODEL], check=0)
        adapter = health()["adapter"]
        assert adapter["version_id"] == ws.vid(1)
        assert adapter["sha256"] == ws.manifest()["versions"][MODEL][0]["sha256"]
        ws.new_adapter(MODEL, "run2", seed=2, zero_b=True)  # untrained: answers like the base model
        proc = deploy(ws, 2, "mac-1", models=[MODEL])
        assert proc.returncode == 4, combined(proc)
        assert health()["adapter"]["version_id"] == ws.vid(1)
        assert ws.active("mac-1") == ws.vid(1)
        # post-activation failure: a bf16 adapter passes a health command that reads no weights, but
        # the server's numpy loader cannot load it → rolled back, and the server confirms the old one
        from test_deploy import GOOD, _rewrite_as_bfloat16

        ws.config.write_text(ws.config.read_text().replace(json.dumps(TRANSLATOR), json.dumps(GOOD)))
        run3 = ws.new_adapter(MODEL, "run3", seed=3)
        _rewrite_as_bfloat16(run3 / "adapter_model.safetensors")
        later = time.time() + 60
        os.utime(run3 / "adapter_model.safetensors", (later, later))
        proc = deploy(ws, 3, "mac-1", models=[MODEL])
        assert proc.returncode == 5, combined(proc)
        assert ws.active("mac-1") == ws.vid(1)
        assert health()["adapter"]["version_id"] == ws.vid(1)
        assert "confirmed it loaded " + ws.vid(1) in combined(proc)
    finally:
        stop_process(served.proc)
