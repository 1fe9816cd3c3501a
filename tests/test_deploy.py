"""End to end: `adapterctl deploy` against two local endpoints, with real files, links, processes."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import MODEL, Workspace, tree_digest, write_config

import adapterctl
from adapterctl.demo import write_bfloat16

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess and the serving stand-in

BOTH = ("--endpoints", "mac-dev", "rtx-1")
DATA = Path(__file__).parent / "data"
LIVE_FAILS = [sys.executable, str(DATA / "e2e_live_fails.py"), "{release}"]
GOOD = [sys.executable, str(DATA / "translator.py"), "good"]  # correct Spanish, reads no weights
SIX_PHASES = ["version", "convert", "transfer", "health-check", "activate", "verify"]
SENTENCES = [
    "Good morning, welcome to the service.",
    "The atonement of Christ provides redemption for sinners.",
    "The apostle James wrote about faith and works.",
    "By grace you have been saved through faith, not of works.",
]


# -- helpers -----------------------------------------------------------------------------------
def deploy(ws, cycle: int, *extra: str, check: int | None = None) -> subprocess.CompletedProcess:
    return ws.cli("deploy", "--cycle", str(cycle), "--all-adapters", *BOTH, *extra, check=check)


def manifest(ws) -> dict:
    return json.loads((ws.store / "manifest.json").read_text())


def entry(ws, cycle: int, model: str = MODEL) -> dict:
    [found] = [v for v in manifest(ws)["versions"][model] if v["cycle"] == cycle]
    return found


def vid(ws, cycle: int, model: str = MODEL) -> str:
    return entry(ws, cycle, model)["version_id"]


def release_dir(ws, endpoint: str, version: str, model: str = MODEL) -> Path:
    return ws.endpoints[endpoint] / model / "releases" / version


def releases(ws, endpoint: str, model: str = MODEL) -> list[str]:
    return sorted(os.listdir(ws.endpoints[endpoint] / model / "releases"))


def compat_link(ws) -> Path:
    return ws.endpoints["mac-dev"].parent / "fine_tuned_gemma_mi_A"


def run_dir(ws, endpoint: str = "mac-dev") -> Path:
    return ws.endpoints[endpoint].parent / "run"


def loaded(ws, endpoint: str = "mac-dev") -> dict:
    return json.loads((run_dir(ws, endpoint) / "loaded.json").read_text())


def start_server(ws, endpoint: str = "mac-dev") -> subprocess.Popen:
    ws.endpoints[endpoint].parent.mkdir(parents=True, exist_ok=True)
    return ws.start_server(endpoint)


def lines_of(ws, deployment_id: str, action: str = "deploy") -> list[dict]:
    return [r for r in ws.log() if r.get("deployment_id") == deployment_id and r.get("action") == action]


def last_deployment(ws) -> str:
    return [r for r in ws.log() if r.get("action") == "deploy"][-1]["deployment_id"]


def line_for(ws, endpoint: str, model: str = MODEL) -> dict:
    [line] = [
        r for r in lines_of(ws, last_deployment(ws)) if r["endpoint"] == endpoint and r["models"] == [model]
    ]
    return line


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(adapter_dir: Path, *, host: str, pid: int, deployment_id: str, user: str = "alice") -> Path:
    adapter_dir.mkdir(parents=True, exist_ok=True)
    lock = adapter_dir / ".adapterctl.lock"
    holder = {
        "user": user,
        "host": host,
        "pid": pid,
        "started_at": "2026-01-01T00:00:00Z",
        "deployment_id": deployment_id,
    }
    lock.write_text(json.dumps(holder) + "\n")
    return lock


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_keys(report: dict) -> list[tuple]:
    return [
        (s["phase"], s["action"], s["endpoint"], s["model"], s["version"], s["summary"])
        for s in report["steps"]
    ]


# -- the happy path (one deploy, read by several tests) --------------------------------------------
@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The conftest workspace, built once for this module, after `deploy --cycle 1` to both endpoints."""
    root = tmp_path_factory.mktemp("happy") / "wörk space"
    root.mkdir()
    ws = Workspace(
        root=root,
        config=write_config(root, extra_model=True),
        store=root / "adapters",
        sources={MODEL: root / "training data" / MODEL, "whisper": root / "training data" / "whisper"},
        endpoints={
            "mac-dev": root / "endpoints" / "mac dev é" / "adapters",
            "rtx-1": root / "endpoints" / "rtx-1 ü" / "adapters",
        },
    )
    ws.new_adapter(MODEL, "run1", seed=1, metrics={"final_loss": 0.9})
    ws.new_adapter("whisper", "run1", seed=11, targets=("q_proj", "k_proj", "v_proj"))
    deploy(ws, 1, check=0)
    return ws


def test_deploy_publishes_verified_releases_and_activates_them_on_every_endpoint(deployed):
    ws = deployed
    for model in (MODEL, "whisper"):
        version, files = vid(ws, 1, model), entry(ws, 1, model)["files"]
        for endpoint in ("mac-dev", "rtx-1"):
            rel = release_dir(ws, endpoint, version, model)
            meta = json.loads((rel / "RELEASE.json").read_text())
            assert meta["version_id"] == version and meta["model"] == model
            assert meta["files"] == files
            assert {name: sha256(rel / name) for name in files} == files
            link = ws.endpoints[endpoint] / model / "active"
            assert os.readlink(link) == f"releases/{version}"  # relative: survives moving adapter_dir
            assert os.path.samefile(link, rel)


def test_deploy_points_the_compat_link_at_the_active_link(deployed):
    ws = deployed
    link = compat_link(ws)
    assert link.is_symlink()
    assert os.readlink(link).endswith(f"/{MODEL}/active")
    assert os.path.samefile(os.readlink(link), ws.endpoints["mac-dev"] / MODEL / "active")
    assert os.path.samefile(link, release_dir(ws, "mac-dev", vid(ws, 1)))
    assert not (ws.endpoints["rtx-1"].parent / "fine_tuned_gemma_mi_A").exists()


def test_deploy_writes_status_json_on_each_endpoint(deployed):
    ws = deployed
    for endpoint in ("mac-dev", "rtx-1"):
        status = ws.status_json(endpoint)["models"][MODEL]
        assert status["active_version"] == vid(ws, 1)
        assert status["health_status"] == "healthy"
        assert status["last_good_version"] == vid(ws, 1)


def test_deploy_logs_one_line_per_endpoint_and_model_with_every_field(deployed):
    ws = deployed
    dep = last_deployment(ws)
    lines = lines_of(ws, dep)
    assert Counter((r["endpoint"], tuple(r["models"])) for r in lines) == {
        ("mac-dev", (MODEL,)): 1,
        ("mac-dev", ("whisper",)): 1,
        ("rtx-1", (MODEL,)): 1,
        ("rtx-1", ("whisper",)): 1,
    }
    for r in lines:
        for key in ("phases_completed", "health_check_results", "duration_s"):
            assert key in r, key
        assert r["cycle"] == 1
        assert r["status"] == "success"
        assert [p for p in r["phases_completed"] if p in SIX_PHASES] == SIX_PHASES
        assert isinstance(r["duration_s"], int | float) and r["duration_s"] >= 0
        assert r["user"] == getpass.getuser()
        assert r["adapterctl_version"] == adapterctl.__version__
    for r in (x for x in lines if x["models"] == [MODEL]):
        health = r["health_check_results"]
        for when in ("pre_activation", "post_activation"):
            assert health[when]["all_passed"] is True
            assert isinstance(health[when]["latency_p50_ms"], int | float)
            assert health[when]["failures"] == []


def test_deploy_records_the_deployment_in_the_manifest(deployed):
    ws = deployed
    dep = last_deployment(ws)
    [record] = [d for d in manifest(ws)["deployments"] if d["id"] == dep]
    assert record["status"] == "success"
    assert record["cycle"] == 1
    assert sorted(record["endpoints"]) == ["mac-dev", "rtx-1"]
    assert sorted(record["models"]) == [MODEL, "whisper"]


def test_paths_with_spaces_and_non_ascii_characters_work_end_to_end(deployed):
    ws = deployed
    for path in (ws.root, ws.endpoints["mac-dev"], ws.endpoints["rtx-1"], ws.sources[MODEL]):
        assert " " in str(path) and not str(path).isascii()
    rows = ws.cli_json("status", *BOTH, check=0)
    active = {(r["endpoint"], r["model"]): r["active"] for r in rows}
    assert active[("mac-dev", MODEL)] == active[("rtx-1", MODEL)] == vid(ws, 1)
    assert all(not r["drift"] for r in rows)
    # the health command got the path with spaces as one argument and read the weights there
    assert line_for(ws, "mac-dev")["health_check_results"]["pre_activation"]["all_passed"] is True
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", vid(ws, 1)))


# -- dry run ------------------------------------------------------------------------------------
def test_dry_run_on_a_fresh_workspace_touches_nothing_and_lists_every_step(workspace):
    ws = workspace
    before = tree_digest(ws.root)
    text = deploy(ws, 1, "--dry-run", check=0)
    plan = json.loads(deploy(ws, 1, "--dry-run", "--json", check=0).stdout)
    assert tree_digest(ws.root) == before
    assert not ws.endpoints["mac-dev"].exists() and not (ws.store / "manifest.json").exists()
    assert plan["dry_run"] is True and plan["steps"]
    assert "DRY RUN" in text.stdout
    for step in plan["steps"]:
        assert step["summary"] in text.stdout, step
    phases = {s["phase"] for s in plan["steps"]}
    assert {"version", "convert", "transfer", "health-check", "activate", "verify", "lock"} <= phases


def test_dry_run_touches_nothing_and_plans_exactly_the_steps_the_real_run_executes(workspace):
    ws = workspace
    for cycle in (1, 2):  # a first deploy, then a new cycle on top of it
        if cycle == 2:
            ws.new_adapter(MODEL, "run2", seed=2)
        before = tree_digest(ws.root)
        text = deploy(ws, cycle, "--dry-run", check=0)
        planned = json.loads(deploy(ws, cycle, "--dry-run", "--json", check=0).stdout)
        assert tree_digest(ws.root) == before
        for step in planned["steps"]:
            assert step["summary"] in text.stdout, step
        executed = json.loads(deploy(ws, cycle, "--json", check=0).stdout)
        assert executed["dry_run"] is False and executed["exit_code"] == 0
        assert step_keys(planned) == step_keys(executed)
        assert planned["bytes_to_send"] == executed["bytes_to_send"]


# -- idempotence and incremental transfer -------------------------------------------------------
def test_redeploying_the_active_version_changes_nothing_and_sends_nothing(workspace):
    ws = workspace
    deploy(ws, 1, check=0)
    endpoints_before = tree_digest(ws.root / "endpoints")
    store_before = [tree_digest(ws.store / m) for m in (MODEL, "whisper")]
    versions_before = manifest(ws)["versions"]
    again = deploy(ws, 1, check=0)
    assert "already active" in again.stdout + again.stderr
    report = json.loads(deploy(ws, 1, "--json", check=0).stdout)
    assert report["bytes_to_send"] == 0
    assert sum(o["bytes_sent"] for o in report["outcomes"]) == 0
    assert tree_digest(ws.root / "endpoints") == endpoints_before
    assert [tree_digest(ws.store / m) for m in (MODEL, "whisper")] == store_before
    assert manifest(ws)["versions"] == versions_before
    for endpoint in ("mac-dev", "rtx-1"):
        assert releases(ws, endpoint) == [vid(ws, 1)]


def test_a_new_cycle_sends_only_changed_files_and_hard_links_the_rest(workspace):
    ws = workspace
    deploy(ws, 1, check=0)
    ws.new_adapter(MODEL, "run2", seed=2)  # same adapter_config.json, new weights
    deploy(ws, 2, check=0)
    old, new = vid(ws, 1), vid(ws, 2)
    weights = entry(ws, 2)["files"]
    assert entry(ws, 1)["files"]["adapter_config.json"] == weights["adapter_config.json"]
    for endpoint in ("mac-dev", "rtx-1"):
        a, b = release_dir(ws, endpoint, old), release_dir(ws, endpoint, new)
        assert (a / "adapter_config.json").stat().st_ino == (b / "adapter_config.json").stat().st_ino
        assert (a / "adapter_model.safetensors").stat().st_ino != (
            b / "adapter_model.safetensors"
        ).stat().st_ino
        assert line_for(ws, endpoint)["bytes_sent"] == (b / "adapter_model.safetensors").stat().st_size
        assert ws.active(endpoint) == new and ws.previous(endpoint) == old


# -- health check before activation -------------------------------------------------------------
def test_deploy_aborts_and_keeps_active_when_health_fails_before_activation(workspace):
    ws = workspace
    deploy(ws, 1, check=0)
    ws.new_adapter(MODEL, "run2", seed=2, zero_b=True)  # untrained: the model answers in English
    result = deploy(ws, 2, check=4)
    output = result.stdout + result.stderr
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.active(endpoint) == vid(ws, 1)
        status = ws.status_json(endpoint)["models"][MODEL]
        assert status["active_version"] == vid(ws, 1) and status["health_status"] == "healthy"
        line = line_for(ws, endpoint)
        assert line["status"] == "aborted"
        pre = line["health_check_results"]["pre_activation"]
        assert pre["all_passed"] is False
        assert {f["input"]: f["output"] for f in pre["failures"]} == {s: s for s in SENTENCES}
        assert "post_activation" not in line["health_check_results"]
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", vid(ws, 1)))
    for sentence in SENTENCES:  # the input and the model's actual (English) output
        assert output.count(sentence) >= 2, sentence


# -- failure after activation: automatic rollback ------------------------------------------------
def test_deploy_rolls_back_by_itself_when_the_live_check_fails(workspace):
    ws = workspace
    deploy(ws, 1, check=0)
    write_config(ws.root, health_command=LIVE_FAILS, extra_model=True)
    ws.new_adapter(MODEL, "run2", seed=2)
    result = deploy(ws, 2, check=5)
    assert "rolled back" in (result.stdout + result.stderr).lower()
    for endpoint in ("mac-dev", "rtx-1"):
        assert ws.active(endpoint) == vid(ws, 1)
        status = ws.status_json(endpoint)["models"][MODEL]
        assert status["active_version"] == vid(ws, 1)
        assert status["health_status"] == "rolled_back"
        assert status["last_failed_version"] == vid(ws, 2)
        assert status["last_good_version"] == vid(ws, 1)
        line = line_for(ws, endpoint)
        assert line["status"] == "rolled_back"
        assert line["health_check_results"]["pre_activation"]["all_passed"] is True
        assert line["health_check_results"]["post_activation"]["all_passed"] is False
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", vid(ws, 1)))
    [record] = [d for d in manifest(ws)["deployments"] if d["id"] == last_deployment(ws)]
    assert record["status"] == "rolled_back"


def _rewrite_as_bfloat16(weights: Path) -> None:
    """Re-save a float32 safetensors file as bfloat16, with a valid header."""
    write_bfloat16(weights, weights)


def test_deploy_rolls_back_by_itself_when_the_server_fails_to_load_the_new_release(workspace):
    # A bfloat16 adapter is valid (adapterctl checks its header and shapes; this health command
    # does not read weights), but the serving stand-in loads weights with numpy, which has no
    # bfloat16: the reload really fails, and the deploy must roll back by itself.
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True, health_command=GOOD)
    start_server(ws)
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH, check=0)
    assert loaded(ws)["version_id"] == vid(ws, 1)
    run2 = ws.new_adapter(MODEL, "run2", seed=2)
    _rewrite_as_bfloat16(run2 / "adapter_model.safetensors")
    newer = time.time() + 60  # the rewrite reset its mtime: keep run2 the newest training output
    os.utime(run2 / "adapter_model.safetensors", (newer, newer))
    ws.cli("deploy", "--cycle", "2", "--models", MODEL, *BOTH, check=5)
    assert entry(ws, 2)["dtype"] == "BF16"
    assert ws.active("mac-dev") == vid(ws, 1)
    report = loaded(ws)
    assert report["ok"] is True and report["version_id"] == vid(ws, 1)
    assert "reload-failed" in (run_dir(ws) / "serve.log").read_text()
    status = ws.status_json("mac-dev")["models"][MODEL]
    assert status["health_status"] == "rolled_back" and status["last_failed_version"] == vid(ws, 2)
    assert line_for(ws, "mac-dev")["status"] == "rolled_back"
    assert ws.active("rtx-1") == vid(ws, 2)  # reload none: that endpoint stands on its own result


# -- SIGUSR1 reload -----------------------------------------------------------------------------
def test_sigusr1_reload_is_confirmed_by_what_the_serving_process_loaded(workspace):
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    server = start_server(ws)
    for cycle in (1, 2):
        if cycle == 2:
            ws.new_adapter(MODEL, "run2", seed=2)
        ws.cli("deploy", "--cycle", str(cycle), "--models", MODEL, *BOTH, check=0)
        report = loaded(ws)
        assert report["ok"] is True
        assert report["pid"] == server.pid
        assert report["version_id"] == vid(ws, cycle)
        assert report["sha256"] == entry(ws, cycle)["sha256"]
        assert ws.status_json("mac-dev")["models"][MODEL].get("last_reload")
    assert server.poll() is None


def test_sigusr1_endpoint_serving_two_models_deploys_both(workspace):
    # mac-dev serves gemma_4b and whisper; its one serving process reports gemma_4b only.
    ws = workspace
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    start_server(ws)
    deploy(ws, 1, check=0)
    assert loaded(ws)["version_id"] == vid(ws, 1)
    assert ws.active("mac-dev", "whisper") == vid(ws, 1, "whisper")


@pytest.mark.parametrize("pidfile_state", ["dead pid", "no pidfile"])
def test_sigusr1_deploy_stops_before_the_swap_when_the_server_is_not_running(workspace, pidfile_state):
    ws = workspace
    deploy(ws, 1, check=0)
    write_config(ws.root, mac_reload="sigusr1", extra_model=True)
    pidfile = run_dir(ws) / "serve.pid"
    if pidfile_state == "dead pid":
        pid = dead_pid()
        pidfile.parent.mkdir()
        pidfile.write_text(f"{pid}\n")
    ws.new_adapter(MODEL, "run2", seed=2)
    result = deploy(ws, 2, check=1)
    output = result.stdout + result.stderr
    assert "serve.pid" in output
    if pidfile_state == "dead pid":
        assert str(pid) in output
    assert ws.active("mac-dev") == vid(ws, 1) and ws.previous("mac-dev") is None
    assert os.path.samefile(compat_link(ws), release_dir(ws, "mac-dev", vid(ws, 1)))
    assert ws.status_json("mac-dev")["models"][MODEL]["active_version"] == vid(ws, 1)
    assert line_for(ws, "mac-dev")["status"] == "failed"
    assert ws.active("rtx-1") == vid(ws, 2)


# -- endpoint lock ------------------------------------------------------------------------------
def test_deploy_exits_3_naming_the_holder_when_a_live_process_holds_the_lock(workspace):
    ws = workspace
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(
            ws.endpoints["mac-dev"],
            host="other-host",
            pid=holder.pid,
            deployment_id="20260101T000000Z-a1b2c3",
        )
        before = tree_digest(ws.endpoints["mac-dev"].parent)
        result = deploy(ws, 1, check=3)
        output = result.stdout + result.stderr
        for part in ("alice", "other-host", str(holder.pid), "20260101T000000Z-a1b2c3"):
            assert part in output, part
        assert tree_digest(ws.endpoints["mac-dev"].parent) == before
        assert json.loads(lock.read_text())["pid"] == holder.pid
        assert line_for(ws, "mac-dev")["status"] == "locked"
        assert ws.active("rtx-1") == vid(ws, 1)  # the other endpoint is not held back
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_on_this_host_is_broken_automatically(workspace):
    ws = workspace
    lock = write_lock(
        ws.endpoints["mac-dev"],
        host=socket.gethostname(),
        pid=dead_pid(),
        deployment_id="20260101T000000Z-dead00",
    )
    deploy(ws, 1, check=0)
    assert ws.active("mac-dev") == vid(ws, 1)
    assert not lock.exists()
    [broke] = [r for r in ws.log() if r["action"] == "break_lock"]
    assert broke["endpoint"] == "mac-dev"
    assert broke["broken_holder"]["deployment_id"] == "20260101T000000Z-dead00"


def test_break_lock_breaks_a_live_holders_lock_and_logs_who_broke_it(workspace):
    ws = workspace
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(
            ws.endpoints["mac-dev"],
            host="other-host",
            pid=holder.pid,
            deployment_id="20260101T000000Z-0ld0ld",
        )
        on_mac = ("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "mac-dev")
        ws.cli(*on_mac, check=3)  # held, and nobody asked to break it
        assert ws.active("mac-dev") is None
        ws.cli(*on_mac, "--break-lock", check=0)
        assert ws.active("mac-dev") == vid(ws, 1)
        assert not lock.exists()
        [broke] = [r for r in ws.log() if r["action"] == "break_lock"]
        assert broke["broken_holder"]["deployment_id"] == "20260101T000000Z-0ld0ld"
        assert broke["broken_state"] == "held" and broke["broken_by"].startswith(getpass.getuser())
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "content,named",
    [(b"", "is empty"), (b"\x00\xff\xfe\x01garbage\x00", "binary data"), (b"{not json", "no valid holder")],
)
def test_an_empty_garbage_or_binary_lock_is_named_and_break_lock_clears_it(workspace, content, named):
    ws = workspace
    lock = ws.endpoints["mac-dev"] / ".adapterctl.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(content)
    on_mac = ("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "mac-dev")
    proc = ws.cli(*on_mac, check=3)
    text = proc.stdout + proc.stderr
    assert named in text and "--break-lock" in text and "None@None" not in text, text
    status = ws.cli("status", "--endpoints", "mac-dev", check=0).stdout
    assert named in status, status
    ws.cli(*on_mac, "--break-lock", check=0)
    assert not lock.exists() and ws.active("mac-dev") == vid(ws, 1)
    [broke] = [r for r in ws.log() if r["action"] == "break_lock"]
    assert broke["broken_holder"] is None and broke["broken_state"] in ("empty", "binary", "garbage")


# -- keep_releases ------------------------------------------------------------------------------
def test_keep_releases_prunes_old_releases_but_never_active_or_previous(workspace):
    ws = workspace
    write_config(ws.root, extra_model=True, keep=2)
    for cycle in (1, 2, 3, 4):
        if cycle > 1:
            ws.new_adapter(MODEL, f"run{cycle}", seed=cycle)
        ws.cli("deploy", "--cycle", str(cycle), "--models", MODEL, *BOTH, check=0)
        for endpoint in ("mac-dev", "rtx-1"):
            assert len(releases(ws, endpoint)) <= 2
            assert ws.active(endpoint) == vid(ws, cycle)
            for link in ("active", "previous"):
                path = ws.endpoints[endpoint] / MODEL / link
                assert not os.path.islink(path) or (path / "RELEASE.json").is_file()
    for endpoint in ("mac-dev", "rtx-1"):
        assert releases(ws, endpoint) == sorted([vid(ws, 3), vid(ws, 4)])
        assert ws.previous(endpoint) == vid(ws, 3)
