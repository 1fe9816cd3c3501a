"""manifest.json on the training box: corrupt files are reported and never overwritten, writes are
atomic and serialised by the store lock, and `versions` shows what is recorded.

Everything runs the real CLI (`ws.cli`) as a subprocess against a real workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL, assert_one_line_error, tree_digest

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

WEIGHTS = "adapter_model.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(ws, path: Path | None = None, cycle: int = 1, model: str = MODEL) -> str:
    args = ["register", "--model", model, "--cycle", str(cycle)]
    return ws.cli(*args, *([str(path)] if path is not None else []), check=0).stdout.strip()


def manifest_path(ws) -> Path:
    return ws.store / "manifest.json"


def load(ws) -> dict:
    return json.loads(manifest_path(ws).read_text(encoding="utf-8"))


# --- a corrupt manifest is reported with file, line and column and left untouched ------------

READERS = {
    "versions": ["versions"],
    "deploy --dry-run --cycle": ["deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev", "--dry-run"],
    "deploy --dry-run --version": [
        "deploy",
        "--version",
        "cycle1_20260101_00000000",
        "-e",
        "mac-dev",
        "--dry-run",
    ],
    "deploy": ["deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev"],
    "register": ["register", "--model", "whisper", "--cycle", "2"],
    "status": ["status"],
}


def test_truncated_manifest_makes_every_reader_exit_2_naming_file_line_column_and_leaves_it(workspace):
    ws = workspace
    register(ws, ws.sources[MODEL] / "run1", cycle=1)
    ws.new_adapter(MODEL, "run2", seed=2)
    text = manifest_path(ws).read_text(encoding="utf-8")
    cut = text[: len(text) * 2 // 3]
    manifest_path(ws).write_text(cut, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(cut)
    line, col = e.value.lineno, e.value.colno
    assert line > 1  # the position is somewhere inside a multi-line file
    before = manifest_path(ws).read_bytes()
    digest = tree_digest(ws.root)
    failures = {}
    for command, args in READERS.items():
        proc = ws.cli(*args)
        try:
            assert_one_line_error(proc, str(manifest_path(ws)), f"line {line}", f"column {col}")
            assert manifest_path(ws).read_bytes() == before, "manifest.json changed"
            assert tree_digest(ws.root) == digest, "the workspace changed"
        except AssertionError as exc:
            failures[command] = str(exc).splitlines()[0]
    assert failures == {}


@pytest.mark.parametrize(
    "content, needles",
    [
        (b"", ["line 1", "column 1"]),
        (b'{\n  "schema": 1,\n  "versions": {},\n}\n', ["line 4", "column 1"]),
        (b'{"schema": 1, "versions": []}\n', ["versions"]),
        (b'{"schema": 99, "versions": {}}\n', ["schema"]),
    ],
    ids=["empty", "trailing_comma", "versions_not_object", "newer_schema"],
)
def test_unusable_manifest_is_one_line_error_exit_2_and_is_not_overwritten(workspace, content, needles):
    ws = workspace
    ws.store.mkdir()
    manifest_path(ws).write_bytes(content)
    digest = tree_digest(ws.root)
    assert_one_line_error(ws.cli("versions"), str(manifest_path(ws)), *needles)
    assert manifest_path(ws).read_bytes() == content
    assert tree_digest(ws.root) == digest


def test_register_into_an_unusable_manifest_records_nothing_and_leaves_it(workspace):
    ws = workspace
    ws.store.mkdir()
    content = b'{"schema": 1, "versions": {"gemma_4b": [}\n'
    manifest_path(ws).write_bytes(content)
    assert_one_line_error(
        ws.cli("register", "--model", MODEL, "--cycle", "1"), str(manifest_path(ws)), "line 1"
    )
    assert manifest_path(ws).read_bytes() == content
    # nothing registered: the store may at most have gained register's empty lock file
    assert {p.name for p in ws.store.iterdir()} <= {"manifest.json", ".manifest.lock"}
    assert not (ws.store / ".manifest.lock").exists() or (ws.store / ".manifest.lock").stat().st_size == 0


def test_manifest_that_is_not_utf8_is_one_line_error_exit_2_and_is_not_overwritten(workspace):
    ws = workspace
    register(ws, ws.sources[MODEL] / "run1", cycle=1)
    content = manifest_path(ws).read_bytes().replace(b'"schema"', b'"sch\xffema"', 1)
    manifest_path(ws).write_bytes(content)
    digest = tree_digest(ws.root)
    assert_one_line_error(ws.cli("versions"), str(manifest_path(ws)))
    assert manifest_path(ws).read_bytes() == content
    assert tree_digest(ws.root) == digest


def test_rollback_with_a_corrupt_manifest_is_refused_before_any_endpoint_changes(workspace):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    ws.new_adapter(MODEL, "run2", seed=2)
    ws.cli("deploy", "--cycle", "2", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    first, second = (v["version_id"] for v in load(ws)["versions"][MODEL])
    assert (ws.active("mac-dev"), ws.previous("mac-dev")) == (second, first)
    text = manifest_path(ws).read_text(encoding="utf-8")
    manifest_path(ws).write_text(text[: len(text) // 2], encoding="utf-8")
    before = manifest_path(ws).read_bytes()
    digest = tree_digest(ws.root)
    proc = ws.cli("rollback", "--endpoints", "mac-dev", "--models", MODEL)
    assert_one_line_error(proc, str(manifest_path(ws)), "line", "column")
    assert manifest_path(ws).read_bytes() == before
    assert (ws.active("mac-dev"), ws.previous("mac-dev")) == (second, first)
    assert tree_digest(ws.root) == digest


# --- atomic writes and the store lock ----------------------------------------------------------


def leftovers(store: Path) -> list[str]:
    """Temp or partial files anywhere in the store (atomic writes must leave none behind)."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            if name.endswith((".tmp", ".partial", ".swap")) or ".incoming." in name:
                bad.append(os.path.relpath(os.path.join(dirpath, name), store))
    return bad


def test_register_leaves_no_temp_files_and_a_manifest_that_parses(workspace):
    ws = workspace
    vid = register(ws, ws.sources[MODEL] / "run1", cycle=1)
    assert leftovers(ws.store) == []
    data = load(ws)
    assert data["schema"] == 1
    assert [v["version_id"] for v in data["versions"][MODEL]] == [vid]
    assert set(os.listdir(ws.store)) <= {"manifest.json", ".manifest.lock", MODEL}
    assert os.listdir(ws.store / MODEL) == [vid]


def _popen_register(ws, model: str, cycle: int, path: Path) -> subprocess.Popen:
    env = dict(os.environ, ADAPTERCTL_CONFIG=str(ws.config), COLUMNS="200")
    return subprocess.Popen(
        [sys.executable, "-m", "adapterctl", "register", "--model", model, "--cycle", str(cycle), str(path)],
        env=env,
        cwd=ws.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{out}\nSTDERR:\n{err}"
    return out.strip()


def test_concurrent_registers_of_two_models_from_two_processes_both_land_in_the_manifest(workspace):
    ws = workspace
    procs = [
        _popen_register(ws, MODEL, 1, ws.sources[MODEL] / "run1"),
        _popen_register(ws, "whisper", 1, ws.sources["whisper"] / "run1"),
    ]
    gemma, whisper = (_finish(p) for p in procs)
    data = load(ws)
    assert [v["version_id"] for v in data["versions"][MODEL]] == [gemma]
    assert [v["version_id"] for v in data["versions"]["whisper"]] == [whisper]
    assert (ws.store / MODEL / gemma).is_dir() and (ws.store / "whisper" / whisper).is_dir()
    assert leftovers(ws.store) == []


def test_many_concurrent_registers_lose_no_entry(workspace):
    ws = workspace
    runs = [ws.new_adapter(MODEL, f"run{n}", seed=100 + n) for n in range(2, 6)]
    procs = [_popen_register(ws, MODEL, n + 2, run) for n, run in enumerate(runs)]
    procs.append(_popen_register(ws, "whisper", 1, ws.sources["whisper"] / "run1"))
    ids = [_finish(p) for p in procs]
    data = load(ws)
    recorded = {v["version_id"]: v["sha256"] for v in data["versions"][MODEL]}
    assert recorded == {vid: sha256(run / WEIGHTS) for vid, run in zip(ids[:-1], runs, strict=True)}
    assert [v["version_id"] for v in data["versions"]["whisper"]] == [ids[-1]]
    assert leftovers(ws.store) == []


def test_concurrent_registers_of_the_same_bytes_record_one_entry(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    procs = [_popen_register(ws, MODEL, 1, run1) for _ in range(3)]
    ids = {_finish(p) for p in procs}
    assert len(ids) == 1
    assert [v["version_id"] for v in load(ws)["versions"][MODEL]] == list(ids)
    assert leftovers(ws.store) == []


# --- versions ---------------------------------------------------------------------------------


def test_versions_json_lists_every_entry_and_the_table_shows_them(workspace):
    ws = workspace
    a = register(ws, ws.sources[MODEL] / "run1", cycle=1)
    w = register(ws, ws.sources["whisper"] / "run1", cycle=1, model="whisper")
    rows = ws.cli_json("versions", check=0)
    assert {(r["model"], r["version_id"]) for r in rows} == {(MODEL, a), ("whisper", w)}
    by_id = {r["version_id"]: r for r in rows}
    assert by_id[a]["sha256"] == sha256(ws.sources[MODEL] / "run1" / WEIGHTS)
    assert by_id[a]["training_metrics"] == {"final_loss": 0.9}
    only = ws.cli_json("versions", "--models", "whisper", check=0)
    assert [r["version_id"] for r in only] == [w]
    table = ws.cli("versions", check=0).stdout
    assert a in table and w in table
    assert MODEL in table and "whisper" in table
    assert "0.9" in table  # final_loss


def test_versions_with_no_manifest_is_empty_and_writes_nothing(workspace):
    ws = workspace
    digest = tree_digest(ws.root)
    assert ws.cli_json("versions", check=0) == []
    assert tree_digest(ws.root) == digest
