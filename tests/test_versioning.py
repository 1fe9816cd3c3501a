"""Phase 1, version: ids, content dedupe, conflicts, the immutable store copy and adapter validation.

Every test drives the real CLI (`ws.cli`) on real PEFT-shaped adapters (real safetensors files,
real JSON); an invalid adapter must give one `error:` line (plus an optional hint), exit 2, no
traceback, and leave the whole workspace byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, assert_one_line_error, tree_digest
from safetensors.numpy import save_file

from adapterctl.demo import make_adapter

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ID_RE = re.compile(r"^cycle(\d+)_(\d{8})_([0-9a-f]{8})$")


# --- helpers ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def utc_days() -> set[str]:
    """Today's UTC date, plus tomorrow's when the test runs a minute before midnight."""
    now = datetime.now(UTC)
    return {f"{now:%Y%m%d}", f"{now + timedelta(minutes=1):%Y%m%d}"}


def manifest(ws) -> dict:
    return json.loads((ws.store / "manifest.json").read_text(encoding="utf-8"))


def entries(ws, model: str = MODEL) -> list[dict]:
    return manifest(ws)["versions"].get(model, [])


def register(ws, path: Path | None = None, cycle: int = 1, model: str = MODEL, check: int | None = 0):
    args = ["register", "--model", model, "--cycle", str(cycle)]
    return ws.cli(*args, *([str(path)] if path is not None else []), check=check)


def lora_tensors(
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]], dtype=np.float32, seed: int = 0
) -> dict[str, np.ndarray]:
    """{module leaf: (A shape, B shape)} → PEFT-named lora_A/lora_B tensors for layer 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for leaf, (a, b) in shapes.items():
        prefix = f"base_model.model.model.layers.0.self_attn.{leaf}"
        out[f"{prefix}.lora_A.weight"] = (rng.standard_normal(a) * 0.02).astype(dtype)
        out[f"{prefix}.lora_B.weight"] = (rng.standard_normal(b) * 0.02).astype(dtype)
    return out


def peft_config(r: int = 8, targets=("q_proj", "v_proj"), **extra) -> dict:
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "local/tiny-llama",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
    }
    cfg.update(extra)
    return cfg


def write_adapter(path: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand (for dtypes numpy lacks, e.g. BF16): u64 header length,
    JSON header padded to 8 bytes, then the tensor bytes."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def bf16_bytes(shape: tuple[int, int], seed: int) -> bytes:
    f32 = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    return (f32.view(np.uint32) >> 16).astype("<u2").tobytes()


# --- version id and dedupe -------------------------------------------------------------------


def test_register_prints_version_id_cycle_date_and_sha256_prefix_of_the_weights(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    proc = register(ws, run1, cycle=7)
    vid = proc.stdout.strip()
    m = ID_RE.match(vid)
    assert m, f"stdout is not a version id: {proc.stdout!r}"
    assert m[1] == "7"
    assert m[2] in utc_days()
    assert m[3] == sha256(run1 / WEIGHTS)[:8]
    assert vid in proc.stderr  # progress says what was registered
    (entry,) = entries(ws)
    assert entry["version_id"] == vid and entry["cycle"] == 7


def test_registering_the_same_bytes_again_returns_the_same_id_and_keeps_one_manifest_entry(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    first = register(ws, run1, cycle=1).stdout.strip()
    before = (ws.store / "manifest.json").read_bytes()
    digest = tree_digest(ws.root)
    # once more under the same cycle, and once (without a path: the newest run is run1) under another
    for again in (register(ws, run1, cycle=1), register(ws, cycle=5)):
        assert again.stdout.strip() == first
        assert "already registered" in again.stderr
    assert [e["version_id"] for e in entries(ws)] == [first]
    assert (ws.store / "manifest.json").read_bytes() == before
    assert tree_digest(ws.root) == digest


def test_register_without_a_path_takes_the_newest_run_of_the_models_source(workspace):
    ws = workspace
    run2 = ws.new_adapter(MODEL, "run2", seed=2)
    vid = register(ws, cycle=2).stdout.strip()
    assert vid.endswith("_" + sha256(run2 / WEIGHTS)[:8])


def test_same_weights_with_a_changed_adapter_config_is_a_conflict_exit_2_and_writes_nothing(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    vid = register(ws, run1, cycle=1).stdout.strip()
    altered = ws.root / "altered"
    altered.mkdir()
    (altered / WEIGHTS).write_bytes((run1 / WEIGHTS).read_bytes())
    cfg = json.loads((run1 / CONFIG).read_text())
    cfg["lora_alpha"] = 99
    (altered / CONFIG).write_text(json.dumps(cfg))
    manifest_bytes = (ws.store / "manifest.json").read_bytes()
    digest = tree_digest(ws.root)
    proc = register(ws, altered, cycle=2, check=None)
    assert_one_line_error(proc, vid)
    assert CONFIG in proc.stderr
    assert (ws.store / "manifest.json").read_bytes() == manifest_bytes
    assert tree_digest(ws.root) == digest


# --- the store copy and the manifest entry -------------------------------------------------


def test_store_copy_holds_identical_read_only_bytes_and_manifest_records_files_peft_dtype_metrics(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    (run1 / "training_metrics.json").write_text(
        json.dumps({"final_loss": 0.9, "epochs": 3, "data_hours": 12})
    )
    source_digest = tree_digest(run1)
    vid = register(ws, run1, cycle=1).stdout.strip()
    assert tree_digest(run1) == source_digest  # the source is only read
    stored = ws.store / MODEL / vid
    assert stored.is_dir()
    src_files = sorted(p.name for p in run1.iterdir())
    assert sorted(p.name for p in stored.iterdir()) == src_files
    for name in src_files:
        assert sha256(stored / name) == sha256(run1 / name), name
        mode = (stored / name).stat().st_mode
        assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), f"{name} is writable: {oct(mode)}"

    (entry,) = entries(ws)
    assert entry["version_id"] == vid
    assert entry["files"] == {name: sha256(run1 / name) for name in src_files}
    assert entry["sha256"] == sha256(run1 / WEIGHTS)
    assert entry["size_bytes"] == sum((run1 / n).stat().st_size for n in src_files)
    assert entry["peft"]["r"] == 8
    assert entry["peft"]["lora_alpha"] == 16
    assert entry["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert entry["dtype"] == "F32"
    assert entry["base_model"] == "local/tiny-llama"
    assert entry["training_metrics"] == {"final_loss": 0.9, "epochs": 3, "data_hours": 12}
    assert Path(entry["provenance"]["source_path"]) == run1
    assert entry["cycle"] == 1
    assert entry["retired"] is False
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", entry["created"])


def test_float16_weights_are_recorded_as_dtype_F16(workspace):
    ws = workspace
    src = write_adapter(
        ws.root / "fp16",
        lora_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((8, 64), (64, 8))}, dtype=np.float16),
        peft_config(),
    )
    vid = register(ws, src, cycle=1).stdout.strip()
    (entry,) = entries(ws)
    assert entry["version_id"] == vid
    assert entry["dtype"] == "F16"


def test_bfloat16_weights_are_recorded_as_dtype_BF16(workspace):
    ws = workspace
    src = ws.root / "bf16"
    src.mkdir()
    tensors = {}
    for i, leaf in enumerate(("q_proj", "v_proj")):
        prefix = f"base_model.model.model.layers.0.self_attn.{leaf}"
        tensors[f"{prefix}.lora_A.weight"] = ("BF16", (8, 64), bf16_bytes((8, 64), 2 * i))
        tensors[f"{prefix}.lora_B.weight"] = ("BF16", (64, 8), bf16_bytes((64, 8), 2 * i + 1))
    write_raw_safetensors(src / WEIGHTS, tensors)
    (src / CONFIG).write_text(json.dumps(peft_config()))
    register(ws, src, cycle=1)
    (entry,) = entries(ws)
    assert entry["dtype"] == "BF16"


# --- rank_pattern and newest-run selection --------------------------------------------------


@pytest.mark.parametrize("key", ["v_proj", "model.layers.0.self_attn.v_proj"])
def test_rank_pattern_gives_a_module_its_own_rank_and_validates(workspace, key):
    ws = workspace
    tensors = lora_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((4, 64), (64, 4))})
    src = write_adapter(ws.root / "ranked", tensors, peft_config(r=8, rank_pattern={key: 4}))
    vid = register(ws, src, cycle=1).stdout.strip()
    assert ID_RE.match(vid)
    assert entries(ws)[0]["sha256"] == sha256(src / WEIGHTS)


def test_without_rank_pattern_a_module_of_another_rank_is_rejected(workspace):
    ws = workspace
    tensors = lora_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((4, 64), (64, 4))})
    src = write_adapter(ws.root / "unranked", tensors, peft_config(r=8))
    digest = tree_digest(ws.root)
    assert_one_line_error(register(ws, src, check=None), "v_proj", "r=8")
    assert tree_digest(ws.root) == digest


def deploy_plan(ws, cycle: int) -> dict:
    return ws.cli_json(
        "deploy", "--cycle", str(cycle), "--models", MODEL, "-e", "mac-dev", "--dry-run", check=0
    )


def test_deploy_cycle_picks_the_run_with_the_newest_weights_not_the_last_name(workspace):
    ws = workspace
    run2 = ws.new_adapter(MODEL, "run2", seed=2)
    # a run whose name sorts last but whose weights are older than run2's
    old = make_adapter(ws.sources[MODEL] / "zz_old_run", seed=3)
    t = (run2 / WEIGHTS).stat().st_mtime - 100
    os.utime(old / WEIGHTS, (t, t))
    digest = tree_digest(ws.root)
    plan = deploy_plan(ws, 2)
    (register_step,) = [s for s in plan["steps"] if s["phase"] == "version"]
    assert Path(register_step["args"]["source"]) == run2
    assert register_step["version"].startswith("cycle2_")
    assert register_step["version"].endswith("_" + sha256(run2 / WEIGHTS)[:8])
    assert tree_digest(ws.root) == digest  # a dry run writes nothing


# --- invalid adapters: one line, exit 2, nothing written ------------------------------------


def _corrupt_overwrite_header(src: Path) -> None:
    data = bytearray((src / WEIGHTS).read_bytes())
    data[:16] = b"\xff" * 16
    (src / WEIGHTS).write_bytes(bytes(data))


def _corrupt_truncate(src: Path) -> None:
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_header_length_past_eof(src: Path) -> None:
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])


def _corrupt_json_garbage_header(src: Path) -> None:
    data = (src / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    (src / WEIGHTS).write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _edit_config(**changes):
    def edit(src: Path) -> None:
        cfg = json.loads((src / CONFIG).read_text())
        for k, v in changes.items():
            if v is _DELETE:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (src / CONFIG).write_text(json.dumps(cfg))

    return edit


_DELETE = object()


def _config_not_json(src: Path) -> None:
    (src / CONFIG).write_text('{"peft_type": "LORA", "r": 8,')


def _replace_tensors(shapes):
    def replace(src: Path) -> None:
        save_file(lora_tensors(shapes), str(src / WEIGHTS))

    return replace


def _a_without_b(src: Path) -> None:
    t = lora_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((8, 64), (64, 8))})
    del t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(t, str(src / WEIGHTS))


def _b_without_a(src: Path) -> None:
    t = lora_tensors({"q_proj": ((8, 64), (64, 8))})
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    save_file(t, str(src / WEIGHTS))


def _no_lora_tensors(src: Path) -> None:
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(src / WEIGHTS))


def _missing_weights(src: Path) -> None:
    (src / WEIGHTS).unlink()


def _missing_config(src: Path) -> None:
    (src / CONFIG).unlink()


def _metrics_not_json(src: Path) -> None:
    (src / "training_metrics.json").write_text("{final_loss: 0.4")


CORRUPT_SAFETENSORS = {
    "first_bytes_overwritten": (_corrupt_overwrite_header, [WEIGHTS]),
    "truncated": (_corrupt_truncate, [WEIGHTS]),
    "header_length_larger_than_file": (_corrupt_header_length_past_eof, [WEIGHTS]),
    "header_not_json": (_corrupt_json_garbage_header, [WEIGHTS]),
}
BAD_CONFIG = {
    "missing_r": (_edit_config(r=_DELETE), [CONFIG, "'r'"]),
    "r_is_a_string": (_edit_config(r="8"), [CONFIG, "'r'"]),
    "not_json": (_config_not_json, [CONFIG, "JSON"]),
    "peft_type_not_lora": (_edit_config(peft_type="PREFIX_TUNING"), [CONFIG, "PREFIX_TUNING"]),
    "missing": (_missing_config, [CONFIG]),
}
TENSORS_DISAGREE_WITH_CONFIG = {
    "lora_B_shape_does_not_match_r": (
        _replace_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((8, 64), (64, 4))}),
        ["v_proj", "lora_B", "r=8"],
    ),
    "lora_A_shape_does_not_match_r": (
        _replace_tensors({"q_proj": ((4, 64), (64, 8)), "v_proj": ((8, 64), (64, 8))}),
        ["q_proj", "lora_A", "r=8"],
    ),
    "lora_A_without_its_lora_B": (_a_without_b, ["v_proj", "lora_B"]),
    "lora_B_without_its_lora_A": (_b_without_a, ["q_proj", "lora_A"]),
    "tensors_for_a_module_not_in_target_modules": (
        _replace_tensors({"q_proj": ((8, 64), (64, 8)), "o_proj": ((8, 64), (64, 8))}),
        ["o_proj", "target_modules"],
    ),
    "no_lora_tensors_at_all": (_no_lora_tensors, ["lora_A"]),
}
MISSING_OR_BROKEN_FILES = {
    "missing_adapter_model_safetensors": (_missing_weights, [WEIGHTS]),
    "training_metrics_not_json": (_metrics_not_json, ["training_metrics.json"]),
}


def assert_each_refused(ws, cases: dict) -> None:
    """Write one broken adapter per case, register them all (concurrently, to keep the suite fast):
    each must be a one-line error with exit 2 naming what is wrong, and nothing may be written."""
    sources = {}
    for name, (corrupt, _needles) in cases.items():
        sources[name] = make_adapter(ws.root / "candidates" / name, seed=5, metrics={"final_loss": 0.5})
        corrupt(sources[name])
    digest = tree_digest(ws.root)
    procs = {
        name: ws.popen("register", "--model", MODEL, "--cycle", "1", str(src))
        for name, src in sources.items()
    }
    failures = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        try:
            assert_one_line_error(done, *cases[name][1])
        except AssertionError as exc:
            failures[name] = str(exc).splitlines()[0]
    assert failures == {}
    assert tree_digest(ws.root) == digest
    assert not ws.store.exists()


def test_corrupt_safetensors_header_is_one_line_error_exit_2_and_writes_nothing(workspace):
    assert_each_refused(workspace, CORRUPT_SAFETENSORS)


def test_invalid_adapter_config_is_one_line_error_exit_2_and_writes_nothing(workspace):
    assert_each_refused(workspace, BAD_CONFIG)


def test_tensors_that_disagree_with_r_or_target_modules_are_one_line_error_exit_2_and_write_nothing(
    workspace,
):
    assert_each_refused(workspace, TENSORS_DISAGREE_WITH_CONFIG)


def test_missing_weights_or_unreadable_metrics_are_one_line_error_exit_2_and_write_nothing(workspace):
    assert_each_refused(workspace, MISSING_OR_BROKEN_FILES)


def test_corrupt_safetensors_in_the_newest_run_stops_deploy_dry_run_with_exit_2(workspace):
    ws = workspace
    run2 = ws.new_adapter(MODEL, "run2", seed=2)
    t = (run2 / WEIGHTS).stat().st_mtime
    _corrupt_overwrite_header(run2)
    os.utime(run2 / WEIGHTS, (t, t))  # still the newest run
    digest = tree_digest(ws.root)
    proc = ws.cli("deploy", "--cycle", "2", "--models", MODEL, "--endpoints", "mac-dev", "--dry-run")
    assert_one_line_error(proc, WEIGHTS)
    assert tree_digest(ws.root) == digest


def test_source_directory_with_no_adapter_is_one_line_error_exit_2_and_writes_nothing(workspace):
    ws = workspace
    empty = ws.root / "empty run"
    empty.mkdir()
    digest = tree_digest(ws.root)
    assert_one_line_error(register(ws, empty, check=None))
    assert tree_digest(ws.root) == digest


def test_model_source_with_no_run_holding_weights_is_one_line_error_exit_2(workspace):
    ws = workspace
    run1 = ws.sources["whisper"] / "run1"
    for f in run1.iterdir():
        f.unlink()
    run1.rmdir()
    (ws.sources["whisper"] / "notes").mkdir()  # a subdirectory without an adapter
    digest = tree_digest(ws.root)
    proc = register(ws, model="whisper", check=None)
    assert_one_line_error(proc, str(ws.sources["whisper"]))
    assert tree_digest(ws.root) == digest


def test_nonexistent_adapter_path_is_one_line_error_exit_2(workspace):
    ws = workspace
    digest = tree_digest(ws.root)
    missing = ws.root / "no such run"
    assert_one_line_error(register(ws, missing, check=None), str(missing))
    assert tree_digest(ws.root) == digest


# --- ids that later commands must accept --------------------------------------------------


@pytest.mark.parametrize("cycle", ["-1", "1234567"])
def test_a_cycle_that_cannot_form_a_valid_version_id_is_refused_exit_2_and_writes_nothing(workspace, cycle):
    ws = workspace
    digest = tree_digest(ws.root)
    proc = ws.cli("register", "--model", MODEL, "--cycle", cycle, str(ws.sources[MODEL] / "run1"))
    assert_one_line_error(proc)
    assert tree_digest(ws.root) == digest


def test_register_short_model_flag_before_the_path_keeps_the_path_positional(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    proc = ws.cli("register", "--cycle", "1", "-m", MODEL, str(run1), check=0)
    assert proc.stdout.strip().endswith("_" + sha256(run1 / WEIGHTS)[:8])


def test_target_modules_given_as_dotted_suffixes_match_like_peft(workspace):
    ws = workspace
    tensors = lora_tensors({"q_proj": ((8, 64), (64, 8)), "v_proj": ((8, 64), (64, 8))})
    src = write_adapter(
        ws.root / "dotted", tensors, peft_config(targets=("self_attn.q_proj", "self_attn.v_proj"))
    )
    register(ws, src, cycle=1)
    assert entries(ws)[0]["peft"]["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]


def test_training_metrics_that_are_not_an_object_do_not_break_versions(workspace):
    ws = workspace
    src = make_adapter(ws.root / "list metrics", seed=4)
    (src / "training_metrics.json").write_text("[0.42, 0.40]")
    digest = tree_digest(ws.root)
    proc = register(ws, src, check=None)
    if proc.returncode == 2:  # rejected as invalid: then it must be a clean one-line error
        assert_one_line_error(proc, "training_metrics.json")
        assert tree_digest(ws.root) == digest
    else:
        assert proc.returncode == 0, proc.stderr
        ws.cli("versions", check=0)


def test_an_id_already_recorded_for_other_bytes_is_a_conflict_exit_2_and_writes_nothing(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    vid = register(ws, run1, cycle=1).stdout.strip()
    path = ws.store / "manifest.json"
    data = json.loads(path.read_text())
    data["versions"][MODEL][0]["sha256"] = "0" * 64  # the recorded id now stands for other bytes
    path.write_text(json.dumps(data, indent=2))
    digest = tree_digest(ws.root)
    assert_one_line_error(register(ws, run1, cycle=1, check=None), vid)
    assert tree_digest(ws.root) == digest


def test_a_damaged_store_copy_is_a_conflict_not_silently_reused(workspace):
    ws = workspace
    run1 = ws.sources[MODEL] / "run1"
    vid = register(ws, run1, cycle=1).stdout.strip()
    stored = ws.store / MODEL / vid / CONFIG
    os.chmod(stored, 0o644)
    stored.write_text(stored.read_text().replace('"r": 8', '"r": 16'))
    os.chmod(stored, 0o444)
    digest = tree_digest(ws.root)
    assert_one_line_error(register(ws, run1, cycle=1, check=None), str(ws.store / MODEL / vid))
    assert tree_digest(ws.root) == digest
