"""Endpoint operations called the way every transport calls them: JSON in, JSON out, real dirs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from adapterctl.endpoint_ops import handle

MODEL = "gemma_4b"
V1, V2, V3, V4, V5 = (f"cycle{n}_20260301_{n:08x}" for n in range(1, 6))
FILES = {
    "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 8,
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}\n',
}


def call(op: str, **args) -> dict:
    """One endpoint operation through the JSON boundary; returns the decoded response."""
    return json.loads(handle(json.dumps({"op": op, "args": args})))


def ok(op: str, **args):
    response = call(op, **args)
    assert response["ok"], response
    return response["result"]


def error_kind(op: str, **args) -> str:
    response = call(op, **args)
    assert not response["ok"], response
    return response["error"]["kind"]


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def staging(adapter_dir: Path, version: str) -> Path:
    return adapter_dir / MODEL / "staging" / f"{version}.tmp"


def stage(adapter_dir: Path, version: str, files: dict[str, bytes] = FILES) -> Path:
    ok("prepare_staging", adapter_dir=str(adapter_dir), model=MODEL, version=version)
    path = staging(adapter_dir, version)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def publish(adapter_dir: Path, version: str, files: dict[str, bytes] = FILES) -> Path:
    stage(adapter_dir, version, files)
    ok(
        "finalize_release",
        adapter_dir=str(adapter_dir),
        model=MODEL,
        version=version,
        files=digests(files),
        meta={"created": "2026-03-01T00:00:00Z"},
    )
    return adapter_dir / MODEL / "releases" / version


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "endpoint ü" / "adapters"
    path.mkdir(parents=True)
    return path


# -- finalize_release ---------------------------------------------------------------------------
def test_finalize_release_publishes_a_verified_release_with_its_file_list(adapter_dir):
    release = publish(adapter_dir, V1)
    meta = json.loads((release / "RELEASE.json").read_text())
    assert meta["files"] == digests(FILES) and meta["version_id"] == V1 and meta["model"] == MODEL
    assert not staging(adapter_dir, V1).exists()


def test_finalize_release_detects_a_flipped_byte_and_removes_only_the_bad_file(adapter_dir):
    path = stage(adapter_dir, V1)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    response = call(
        "finalize_release",
        adapter_dir=str(adapter_dir),
        model=MODEL,
        version=V1,
        files=digests(FILES),
        meta={},
    )
    assert not response["ok"]
    assert response["error"]["kind"] == "hash_mismatch"
    assert "adapter_model.safetensors" in response["error"]["message"]
    assert not weights.exists()
    assert (path / "adapter_config.json").read_bytes() == FILES["adapter_config.json"]
    assert not (adapter_dir / MODEL / "releases" / V1).exists()
    # a rerun sends the bad file again and then publishes
    weights.write_bytes(FILES["adapter_model.safetensors"])
    ok(
        "finalize_release",
        adapter_dir=str(adapter_dir),
        model=MODEL,
        version=V1,
        files=digests(FILES),
        meta={},
    )
    assert (adapter_dir / MODEL / "releases" / V1 / "RELEASE.json").is_file()


# -- swap_links ---------------------------------------------------------------------------------
def test_symlink_swap_is_atomic_the_active_link_always_resolves(adapter_dir):
    publish(adapter_dir, V1)
    publish(adapter_dir, V2)
    ok("swap_links", adapter_dir=str(adapter_dir), model=MODEL, active=V1, previous=None)
    active = adapter_dir / MODEL / "active"
    stop = threading.Event()
    seen: dict[str, int] = {}
    broken: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                target = os.readlink(active)
                if not (active / "RELEASE.json").is_file():
                    broken.append(f"{target}: does not resolve to a complete release")
                seen[target] = seen.get(target, 0) + 1
            except OSError as exc:
                broken.append(f"{exc.strerror}: {exc.filename}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to hit any gap
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            new, old = (V2, V1) if i % 2 == 0 else (V1, V2)
            ok("swap_links", adapter_dir=str(adapter_dir), model=MODEL, active=new, previous=old)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert broken == []
    assert set(seen) <= {f"releases/{V1}", f"releases/{V2}"} and sum(seen.values()) > 0
    assert os.readlink(active) == f"releases/{V1}"
    assert os.readlink(adapter_dir / MODEL / "previous") == f"releases/{V2}"
    assert sorted(os.listdir(adapter_dir / MODEL)) == ["active", "previous", "releases", "staging"]


def test_swap_links_refuses_a_release_without_release_json_and_changes_no_link(adapter_dir):
    publish(adapter_dir, V1)
    publish(adapter_dir, V3)
    ok("swap_links", adapter_dir=str(adapter_dir), model=MODEL, active=V1, previous=V3)
    incomplete = adapter_dir / MODEL / "releases" / V2
    incomplete.mkdir()
    (incomplete / "adapter_model.safetensors").write_bytes(FILES["adapter_model.safetensors"])
    response = call("swap_links", adapter_dir=str(adapter_dir), model=MODEL, active=V2, previous=V1)
    assert not response["ok"] and response["error"]["kind"] == "missing"
    assert V2 in response["error"]["message"]
    # a refused swap leaves both links as they were
    assert os.readlink(adapter_dir / MODEL / "active") == f"releases/{V1}"
    assert os.readlink(adapter_dir / MODEL / "previous") == f"releases/{V3}"


# -- set_compat_link ----------------------------------------------------------------------------
def test_set_compat_link_refuses_to_replace_a_real_directory(adapter_dir):
    root = adapter_dir.parent
    old = root / "fine_tuned_gemma_mi_A"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"the original deployment")
    response = call(
        "set_compat_link", link=str(old), target=str(adapter_dir / MODEL / "active"), root=str(root)
    )
    assert not response["ok"] and response["error"]["kind"] == "invalid"
    assert response["error"]["hint"]
    assert old.is_dir() and not old.is_symlink()
    assert (old / "adapter_model.safetensors").read_bytes() == b"the original deployment"


def test_set_compat_link_replaces_an_existing_link_and_refuses_paths_outside_root(adapter_dir):
    root = adapter_dir.parent
    link = root / "fine_tuned_gemma_mi_A"
    link.symlink_to("somewhere/else")
    target = str(adapter_dir / MODEL / "active")
    ok("set_compat_link", link=str(link), target=target, root=str(root))
    assert os.readlink(link) == target
    outside = root.parent / "fine_tuned_elsewhere"
    assert error_kind("set_compat_link", link=str(outside), target=target, root=str(root)) == "invalid"
    assert not os.path.lexists(outside)


# -- prune --------------------------------------------------------------------------------------
def test_prune_never_removes_what_active_or_previous_point_to(adapter_dir):
    versions = [V1, V2, V3, V4, V5]
    for age, version in enumerate(reversed(versions)):
        release = publish(adapter_dir, version)
        os.utime(release, (time.time() - 100 * (age + 1),) * 2)  # V1 oldest ... V5 newest
    ok("swap_links", adapter_dir=str(adapter_dir), model=MODEL, active=V1, previous=V2)
    removed = ok("prune", adapter_dir=str(adapter_dir), model=MODEL, names=[V1, V2, V3, V4])
    assert sorted(removed) == [V3, V4]
    assert sorted(os.listdir(adapter_dir / MODEL / "releases")) == [V1, V2, V5]
    for link in ("active", "previous"):
        assert (adapter_dir / MODEL / link / "RELEASE.json").is_file()


# -- lock ---------------------------------------------------------------------------------------
def holder(deployment_id: str) -> dict:
    return {
        "user": "u",
        "host": "h",
        "pid": 1,
        "started_at": "2026-03-01T00:00:00Z",
        "deployment_id": deployment_id,
    }


def test_lock_acquire_is_exclusive(adapter_dir):
    first = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-1"))
    assert first["acquired"] is True
    second = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-2"))
    assert second["acquired"] is False
    assert second["lock"]["state"] == "held" and second["lock"]["holder"]["deployment_id"] == "dep-1"
    assert not ok("lock_release", adapter_dir=str(adapter_dir), deployment_id="dep-2")
    assert json.loads((adapter_dir / ".adapterctl.lock").read_text())["deployment_id"] == "dep-1"
    assert ok("lock_release", adapter_dir=str(adapter_dir), deployment_id="dep-1")
    assert ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-2"))["acquired"] is True


def test_lock_acquire_with_break_sha_breaks_only_that_exact_lock(adapter_dir):
    lock = adapter_dir / ".adapterctl.lock"
    ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-stale"))
    stale = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-x"))["lock"]["raw_sha"]
    wrong = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-2"), break_sha="0" * 64)
    assert wrong["acquired"] is False
    assert json.loads(lock.read_text())["deployment_id"] == "dep-stale"
    broke = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-2"), break_sha=stale)
    assert broke["acquired"] is True and broke["broken"]["holder"]["deployment_id"] == "dep-stale"
    # a second breaker that also saw dep-stale must not win over dep-2
    late = ok("lock_acquire", adapter_dir=str(adapter_dir), holder=holder("dep-3"), break_sha=stale)
    assert late["acquired"] is False and late["lock"]["holder"]["deployment_id"] == "dep-2"
    assert json.loads(lock.read_text())["deployment_id"] == "dep-2"


# -- names --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("prepare_staging", {"model": "../escape", "version": V1}),
        ("prepare_staging", {"model": "a/b", "version": V1}),
        ("prepare_staging", {"model": "gemma..4b", "version": V1}),
        ("prepare_staging", {"model": MODEL, "version": f"../../{V1}"}),
        ("prepare_staging", {"model": MODEL, "version": f"{V1}/.."}),
        ("remove_staging", {"model": MODEL, "version": ".."}),
        ("finalize_release", {"model": "..", "version": V1, "files": {}, "meta": {}}),
        ("verify_release", {"model": MODEL, "version": f"x/{V1}", "files": {}}),
        ("swap_links", {"model": MODEL, "active": "../../..", "previous": None}),
        ("swap_links", {"model": "../gemma_4b", "active": V1, "previous": None}),
        ("prune", {"model": "../..", "names": [V1]}),
        ("update_status", {"endpoint": "e", "model": "../x", "fields": {}, "now": "t"}),
    ],
)
def test_names_with_dotdot_or_slash_are_refused(adapter_dir, op, args):
    before = sorted(p.name for p in adapter_dir.parent.parent.iterdir())
    assert error_kind(op, adapter_dir=str(adapter_dir), **args) == "invalid"
    assert sorted(p.name for p in adapter_dir.parent.parent.iterdir()) == before
    assert list(adapter_dir.iterdir()) == []


def test_base_gguf_hash_is_recorded_by_stamp_and_recomputed_when_the_file_changes(tmp_path):
    from adapterctl import endpoint_ops

    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    first = endpoint_ops.gguf_facts(str(gguf), str(adapter_dir))
    assert first["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest() and not first["sha256_cached"]
    assert not endpoint_ops.remember_base_gguf(str(adapter_dir), str(gguf), "1|2|3", first["sha256"])
    assert endpoint_ops.remember_base_gguf(str(adapter_dir), str(gguf), first["stamp"], first["sha256"])
    again = endpoint_ops.gguf_facts(str(gguf), str(adapter_dir))
    assert again["sha256_cached"] and again["sha256"] == first["sha256"]
    gguf.write_bytes(b"GGUF" + bytes(99) + b"\x01")  # same size, new bytes and mtime
    os.utime(gguf, ns=(0, 10**9))
    changed = endpoint_ops.gguf_facts(str(gguf), str(adapter_dir))
    assert not changed["sha256_cached"] and changed["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    (adapter_dir / endpoint_ops.BASE_GGUF_HASHES).write_text("{not json")  # a damaged cache is only a cache
    assert not endpoint_ops.gguf_facts(str(gguf), str(adapter_dir))["sha256_cached"]
    assert endpoint_ops.remember_base_gguf(str(adapter_dir), str(gguf), changed["stamp"], changed["sha256"])
