"""A damaged file in the newest release never spreads into the next one: unchanged files are hard-linked
from it only when their recorded stamp still holds (else re-hashed there), and a file that still fails
the endpoint's hash check at publish is sent again with the basis re-hashed."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import MODEL
from test_ssh import deploy_json, ssh_workspace  # noqa: F401 - the fixture

pytestmark = pytest.mark.heavy


def _flip(path, keep_mtime: bool) -> None:
    st = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)
    if keep_mtime:  # same size and mtime: only the inode's ctime tells, and rsync's quick check would not
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _unchanged_file(ws, v1: str, v2: str) -> str:
    manifest = json.loads((ws.store / "manifest.json").read_text())
    files = {v["version_id"]: v["files"] for v in manifest["versions"][MODEL]}
    [same] = [f for f in files[v1] if files[v1][f] == files[v2].get(f)]
    return same


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-changed", "mtime-kept"])
def test_a_flipped_byte_in_the_basis_release_never_reaches_the_next_release(ssh_workspace, keep_mtime):  # noqa: F811
    ws = ssh_workspace
    deploy_json(ws, 1, "mac-1", "linux-1", models=[MODEL], check=0)
    v1 = ws.vid(1)
    ws.new_adapter(MODEL, "run2", seed=2)  # new weights, same adapter_config.json
    v2 = ws.register(2)
    same = _unchanged_file(ws, v1, v2)
    want = hashlib.sha256((ws.store / MODEL / v2 / same).read_bytes()).hexdigest()
    for endpoint in ("mac-1", "linux-1"):
        _flip(ws.release(endpoint, v1) / same, keep_mtime)
    report = deploy_json(ws, 2, "mac-1", "linux-1", models=[MODEL], check=0)
    for o in report["outcomes"]:
        assert o["status"] == "success", o
    for endpoint in ("mac-1", "linux-1"):
        got = ws.release(endpoint, v2) / same
        assert hashlib.sha256(got.read_bytes()).hexdigest() == want
        assert got.stat().st_ino != (ws.release(endpoint, v1) / same).stat().st_ino  # not linked
        assert ws.active(endpoint) == v2
