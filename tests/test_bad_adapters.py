"""Bad adapters never go live (issue 12, items 1-3): one table of damaged adapter directories, each
run through the real CLI `register` (some through `deploy --dry-run` and `deploy` too). Each must
exit 2 with one `error:` line naming what is wrong, and leave the store and every endpoint tree
byte-for-byte as they were. Also: what is shipped is an allowlist, the rest is listed as "not
shipped", and the PEFT features land in the manifest and in `versions`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, assert_one_line_error, tree_digest
from safetensors.numpy import save_file
from test_versioning import _DELETE as DELETE
from test_versioning import _edit_config as config

from adapterctl.demo import make_adapter
from adapterctl.formats import safetensors as st

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
METRICS = "training_metrics.json"
Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.1.self_attn.v_proj"


# --- ways to damage a fresh adapter (make_adapter: layers 0-1, q_proj/v_proj, r=8, hidden 64) ---


def symlink(name: str, target: str | Callable[[Path], str]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        link = src / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.symlink(target(src) if callable(target) else target, link)

    return damage


def weights_outside_by_symlink(src: Path) -> None:
    outside = src.parent / f"{src.name}-real-weights.safetensors"
    (src / WEIGHTS).rename(outside)
    os.symlink(outside, src / WEIGHTS)


def fifo(name: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(src / name)

    return damage


def unix_socket(src: Path) -> None:
    cwd = os.getcwd()
    os.chdir(src)  # bind by a short relative name: socket paths are limited to ~108 bytes
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("events.sock")
        sock.close()  # the socket file stays
    finally:
        os.chdir(cwd)


def char_device(src: Path) -> None:
    try:
        os.mknod(src / "tokenizer.model", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD)")


def edit_tensor(name: str, fn: Callable[[np.ndarray], np.ndarray], dtype: str = "F32") -> Callable:
    """Rewrite the weights with tensor `name` changed by fn (float32 in) and every tensor as `dtype`."""

    def damage(src: Path) -> None:
        f = st.SafetensorsFile(src / WEIGHTS)
        arrays = f.float32_all()
        with np.errstate(over="ignore"):
            arrays[name] = fn(arrays[name].copy())
        with np.errstate(over="ignore"):  # 1e6 in F16 is meant to overflow to Inf
            tensors = {n: (dtype, a.shape, st.encode(a, dtype)) for n, a in arrays.items()}
        del f
        st.write(src / WEIGHTS, tensors, {})

    return damage


def put(value: float, index: tuple[int, int] = (3, 5)) -> Callable[[np.ndarray], np.ndarray]:
    def fn(a: np.ndarray) -> np.ndarray:
        a[index] = value
        return a

    return fn


def as_dtype(np_dtype) -> Callable:
    def damage(src: Path) -> None:
        from safetensors.numpy import load_file

        tensors = load_file(str(src / WEIGHTS))
        tensors[V + ".lora_B.weight"] = (tensors[V + ".lora_B.weight"] * 100).astype(np_dtype)
        save_file(tensors, str(src / WEIGHTS))

    return damage


def drop_tensor(name: str) -> Callable:
    def damage(src: Path) -> None:
        from safetensors.numpy import load_file

        tensors = load_file(str(src / WEIGHTS))
        del tensors[name]
        save_file(tensors, str(src / WEIGHTS))

    return damage


def add_tensor(name: str) -> Callable:
    def damage(src: Path) -> None:
        from safetensors.numpy import load_file

        tensors = load_file(str(src / WEIGHTS))
        tensors[name] = np.zeros((64,), np.float32)
        save_file(tensors, str(src / WEIGHTS))

    return damage


def reshape_tensor(name: str, shape: tuple[int, ...]) -> Callable:
    def damage(src: Path) -> None:
        from safetensors.numpy import load_file

        tensors = load_file(str(src / WEIGHTS))
        tensors[name] = np.zeros(shape, np.float32)
        save_file(tensors, str(src / WEIGHTS))

    return damage


def config_text(old: str, new: str) -> Callable:
    """Edit adapter_config.json as text (for what json.dumps cannot write: NaN, duplicate keys)."""

    def damage(src: Path) -> None:
        text = (src / CONFIG).read_text()
        assert old in text, (old, text)
        (src / CONFIG).write_text(text.replace(old, new, 1))

    return damage


def metrics_text(text: str) -> Callable:
    def damage(src: Path) -> None:
        (src / METRICS).write_text(text)

    return damage


def duplicate_nested_key(src: Path) -> None:
    text = (src / CONFIG).read_text()
    (src / CONFIG).write_text(
        text.replace('"r": 8', '"rank_pattern": {"q_proj": 8, "q_proj": 4},\n  "r": 8', 1)
    )


def config_not_an_object(src: Path) -> None:
    (src / CONFIG).write_text("[1, 2]")


# (id, damage, expected exit code, fragments the one error line must hold)
BAD_ADAPTERS = [
    # 1. the directory: only regular files
    ("symlink_to_etc_passwd", symlink("tokenizer.json", "/etc/passwd"), 2, ["tokenizer.json", "symlink"]),
    ("symlink_inside", symlink("README.md", lambda s: str(s / CONFIG)), 2, ["README.md", "symlink"]),
    ("relative_symlink_inside", symlink(METRICS, CONFIG), 2, [METRICS, "symlink"]),
    ("weights_are_a_symlink", weights_outside_by_symlink, 2, [WEIGHTS, "symlink"]),
    ("dangling_symlink", symlink("merges.txt", "/nonexistent/merges.txt"), 2, ["merges.txt", "symlink"]),
    ("symlink_to_dir_outside", symlink("checkpoint-100", "/etc"), 2, ["checkpoint-100", "symlink"]),
    ("symlink_to_dir_inside", symlink("again", "."), 2, ["again", "symlink"]),
    (
        "symlink_deep_in_a_subdir",
        symlink("logs/run/latest", "/etc/passwd"),
        2,
        ["logs/run/latest", "symlink"],
    ),
    ("fifo", fifo("special_tokens_map.json"), 2, ["special_tokens_map.json", "FIFO"]),
    ("fifo_in_a_subdir", fifo("checkpoint-5/pipe"), 2, ["checkpoint-5/pipe", "FIFO"]),
    ("socket", unix_socket, 2, ["events.sock", "socket"]),
    ("device", char_device, 2, ["tokenizer.model", "device"]),
    # 2. the weights
    ("nan_in_lora_b_f32", edit_tensor(V + ".lora_B.weight", put(np.nan)), 2, [V + ".lora_B", "NaN"]),
    ("inf_in_lora_a_f16", edit_tensor(Q + ".lora_A.weight", put(np.inf), "F16"), 2, [Q + ".lora_A", "Inf"]),
    ("neg_inf_bf16", edit_tensor(V + ".lora_A.weight", put(-np.inf), "BF16"), 2, [V + ".lora_A", "Inf"]),
    ("nan_bf16_last_value", edit_tensor(Q + ".lora_B.weight", put(np.nan, (-1, -1)), "BF16"), 2, ["NaN"]),
    ("f16_overflow_to_inf", edit_tensor(Q + ".lora_B.weight", put(1e6), "F16"), 2, [Q + ".lora_B"]),
    ("int32_tensor", as_dtype(np.int32), 2, [V + ".lora_B.weight", "I32"]),
    ("int8_tensor", as_dtype(np.int8), 2, [V + ".lora_B.weight", "I8"]),
    ("float64_tensor", as_dtype(np.float64), 2, [V + ".lora_B.weight", "F64"]),
    ("lora_a_without_b", drop_tensor(V + ".lora_B.weight"), 2, [V, "lora_B"]),
    ("lora_b_without_a", drop_tensor(Q + ".lora_A.weight"), 2, [Q, "lora_A"]),
    ("lora_a_rank_not_r", reshape_tensor(Q + ".lora_A.weight", (4, 64)), 2, [Q, "lora_A", "r=8"]),
    ("lora_b_rank_not_r", reshape_tensor(V + ".lora_B.weight", (64, 16)), 2, [V, "lora_B", "r=8"]),
    ("lora_tensor_3d", reshape_tensor(Q + ".lora_A.weight", (8, 8, 8)), 2, [Q, "2-D"]),
    ("rank_pattern_disagrees", config(rank_pattern={"q_proj": 4}), 2, ["q_proj", "r=4"]),
    ("base_weight_in_the_file", add_tensor("model.embed_tokens.weight"), 2, ["model.embed_tokens.weight"]),
    ("dora_vector_without_dora", add_tensor(Q + ".lora_magnitude_vector"), 2, ["lora_magnitude_vector"]),
    (
        "tensor_outside_target_modules",
        config(target_modules=["q_proj"]),
        2,
        ["v_proj", "target_modules"],
    ),
    # 3. adapter_config.json
    ("lora_alpha_nan", config_text('"lora_alpha": 16', '"lora_alpha": NaN'), 2, [CONFIG, "NaN"]),
    (
        "lora_alpha_infinity",
        config_text('"lora_alpha": 16', '"lora_alpha": Infinity'),
        2,
        [CONFIG, "Infinity"],
    ),
    (
        "lora_dropout_neg_infinity",
        config_text('"lora_dropout": 0.05', '"lora_dropout": -Infinity'),
        2,
        [CONFIG],
    ),
    ("lora_alpha_1e999", config_text('"lora_alpha": 16', '"lora_alpha": 1e999'), 2, [CONFIG, "1e999"]),
    ("nan_in_an_unused_key", config_text('"bias"', '"notes": {"x": NaN},\n  "bias"'), 2, [CONFIG, "NaN"]),
    ("duplicate_r", config_text('"r": 8', '"r": 8,\n  "r": 16'), 2, [CONFIG, "'r'", "twice"]),
    ("duplicate_nested_key", duplicate_nested_key, 2, [CONFIG, "'q_proj'", "twice"]),
    ("r_zero", config(r=0), 2, [CONFIG, "'r'"]),
    ("r_float", config(r=8.0), 2, [CONFIG, "'r'"]),
    ("r_bool", config(r=True), 2, [CONFIG, "'r'"]),
    ("lora_alpha_negative", config(lora_alpha=-16), 2, [CONFIG, "lora_alpha"]),
    ("lora_alpha_zero", config(lora_alpha=0), 2, [CONFIG, "lora_alpha"]),
    ("lora_alpha_string", config(lora_alpha="16"), 2, [CONFIG, "lora_alpha"]),
    ("rank_pattern_zero", config(rank_pattern={"q_proj": 0}), 2, [CONFIG, "rank_pattern"]),
    ("rank_pattern_float", config(rank_pattern={"q_proj": 4.5}), 2, [CONFIG, "rank_pattern"]),
    ("rank_pattern_list", config(rank_pattern=["q_proj"]), 2, [CONFIG, "rank_pattern"]),
    ("alpha_pattern_negative", config(alpha_pattern={"q_proj": -1}), 2, [CONFIG, "alpha_pattern"]),
    ("rank_pattern_bad_regex", config(rank_pattern={"q_proj(": 8}), 2, [CONFIG, "q_proj("]),
    ("rank_pattern_matches_nothing", config(rank_pattern={"o_proj": 8}), 2, [CONFIG, "o_proj"]),
    ("target_modules_empty", config(target_modules=[]), 2, [CONFIG, "target_modules"]),
    ("target_modules_missing", config(target_modules=DELETE), 2, [CONFIG, "target_modules"]),
    ("peft_type_ia3", config(peft_type="IA3"), 2, [CONFIG, "IA3"]),
    ("peft_type_missing", config(peft_type=DELETE), 2, [CONFIG, "peft_type"]),
    ("use_dora_a_string", config(use_dora="yes"), 2, [CONFIG, "use_dora"]),
    ("bias_unknown", config(bias="some"), 2, [CONFIG, "bias"]),
    ("config_not_an_object", config_not_an_object, 2, [CONFIG, "JSON object"]),
    ("metrics_nan", metrics_text('{"final_loss": NaN}'), 2, [METRICS, "NaN"]),
    ("metrics_duplicate_key", metrics_text('{"final_loss": 0.4, "final_loss": 0.3}'), 2, [METRICS, "twice"]),
]


CASES = {name: (damage, code, needles) for name, damage, code, needles in BAD_ADAPTERS}


# --- helpers -----------------------------------------------------------------------------------


def trees(ws) -> dict[str, str]:
    """Digest of the store and of every endpoint tree (a missing tree digests as empty)."""
    roots = {"store": ws.store, **{name: path.parent for name, path in ws.endpoints.items()}}
    return {name: tree_digest(path) if path.exists() else "absent" for name, path in roots.items()}


def damaged(ws, name: str, run: str = "bad") -> Path:
    """A fresh adapter (the newest run of MODEL), damaged as the table says."""
    src = ws.new_adapter(MODEL, run, seed=5, metrics={"final_loss": 0.5})
    damage, _code, _needles = CASES[name]
    mtime = (src / WEIGHTS).lstat().st_mtime + 1000
    damage(src)
    if (src / WEIGHTS).is_file() and not (src / WEIGHTS).is_symlink():
        os.utime(src / WEIGHTS, (mtime, mtime))  # still the newest run, whatever the damage did
    return src


def endpoints_ready(ws) -> None:
    """The endpoints' parent directories exist (adapterctl never creates them), so what is refused
    is the adapter, not the endpoint."""
    for path in ws.endpoints.values():
        path.parent.mkdir(parents=True, exist_ok=True)


def assert_refused(ws, proc, name: str, before: dict[str, str]) -> None:
    _damage, code, needles = CASES[name]
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr}"
    assert_one_line_error(proc, *needles)
    assert trees(ws) == before, "the store or an endpoint changed"


# --- the table ---------------------------------------------------------------------------------


def test_the_table_has_at_least_25_distinct_bad_adapters():
    assert len(CASES) == len(BAD_ADAPTERS) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_register_refuses_a_bad_adapter_exit_2_one_line_nothing_written(workspace, name):
    ws = workspace
    src = damaged(ws, name)
    before = trees(ws)
    proc = ws.cli("register", "--model", MODEL, "--cycle", "2", str(src))
    assert_refused(ws, proc, name, before)
    assert not ws.store.exists()


DEPLOYED = [
    "symlink_to_etc_passwd",
    "fifo",
    "nan_in_lora_b_f32",
    "int32_tensor",
    "lora_alpha_nan",
    "duplicate_r",
    "rank_pattern_disagrees",
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "deploy"])
@pytest.mark.parametrize("name", DEPLOYED)
def test_deploy_refuses_a_bad_newest_adapter_before_anything_is_written(workspace, name, dry_run):
    ws = workspace
    endpoints_ready(ws)
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "mac-dev", "rtx-1", check=0)  # a live version
    damaged(ws, name, run="run2")
    before = trees(ws)
    args = ["deploy", "--cycle", "2", "--models", MODEL, "-e", "mac-dev", "rtx-1"]
    proc = ws.cli(*args, *(["--dry-run"] if dry_run else []))
    assert_refused(ws, proc, name, before)


# --- what is shipped ---------------------------------------------------------------------------


def _training_leftovers(src: Path) -> dict[str, int]:
    """Files a trainer leaves beside the adapter; returns what `not shipped` must list (name → bytes)."""
    (src / "optimizer.pt").write_bytes(b"\0" * 300_000)
    (src / "scheduler.pt").write_bytes(b"s" * 1_000)
    (src / "rng_state_0.pth").write_bytes(b"r" * 2_000)
    (src / "trainer_state.json").write_text('{"global_step": 100}')
    (src / "README.md").write_text("# model card\n")
    (src / ".DS_Store").write_bytes(b"x" * 10)
    (src / "checkpoint-100").mkdir()
    (src / "checkpoint-100" / "optimizer.pt").write_bytes(b"\0" * 5_000)
    (src / ".git" / "objects").mkdir(parents=True)
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    return {
        ".DS_Store": 10,
        ".git/": 21,
        "README.md": 13,
        "checkpoint-100/": 5_000,
        "optimizer.pt": 300_000,
        "rng_state_0.pth": 2_000,
        "scheduler.pt": 1_000,
        "trainer_state.json": 20,
    }


SHIPPED = {CONFIG, WEIGHTS, METRICS, "tokenizer.json", "chat_template.jinja"}


def test_only_the_allowlist_is_stored_and_the_rest_is_listed_once_as_not_shipped(workspace):
    ws = workspace
    src = ws.sources[MODEL] / "run1"
    left = _training_leftovers(src)
    proc = ws.cli("register", "--model", MODEL, "--cycle", "1", check=0)
    vid = proc.stdout.strip()
    assert {p.name for p in (ws.store / MODEL / vid).iterdir()} == SHIPPED
    (entry,) = json.loads((ws.store / "manifest.json").read_text())["versions"][MODEL]
    assert set(entry["files"]) == SHIPPED
    assert entry["size_bytes"] == sum((src / n).stat().st_size for n in SHIPPED)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("not shipped: ")]
    assert [line.split()[2] for line in lines] == sorted(left)  # each once
    assert "not shipped: optimizer.pt (" in proc.stderr


def test_deploy_ships_only_the_allowlist_and_says_what_stays_behind(workspace):
    ws = workspace
    endpoints_ready(ws)
    src = ws.sources[MODEL] / "run1"
    left = _training_leftovers(src)
    proc = ws.cli("deploy", "--cycle", "1", "--models", MODEL, "-e", "rtx-1", check=0)
    release = ws.endpoints["rtx-1"] / MODEL / "active"
    shipped = {p.name for p in release.iterdir()} - {"RELEASE.json"}
    assert shipped == SHIPPED
    listed = [line.split()[2] for line in proc.stderr.splitlines() if line.startswith("not shipped: ")]
    assert listed == sorted(left)


# --- features ----------------------------------------------------------------------------------


def test_peft_features_are_recorded_in_the_manifest_and_shown_by_versions(workspace):
    ws = workspace
    src = ws.sources[MODEL] / "run1"
    config(use_rslora=True, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 4})(src)
    vid = ws.cli("register", "--model", MODEL, "--cycle", "1", check=0).stdout.strip()
    text = (ws.store / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (entry,) = json.loads(text)["versions"][MODEL]
    assert entry["features"] == {
        "use_dora": False,
        "use_rslora": True,
        "modules_to_save": None,
        "bias": "none",
        "rank_pattern": {"v_proj": 8},
        "alpha_pattern": {"q_proj": 4},
    }
    out = ws.cli("versions", check=0).stdout
    assert vid in out and "rslora" in out and "rank_pattern(1)" in out
    (row,) = ws.cli_json("versions", check=0)
    assert row["features"]["use_rslora"] is True


def test_a_plain_lora_adapter_shows_as_lora_in_versions(workspace):
    ws = workspace
    make_adapter(ws.root / "plain", seed=3)
    ws.cli("register", "--model", MODEL, "--cycle", "1", str(ws.root / "plain"), check=0)
    assert "lora" in ws.cli("versions", check=0).stdout


def test_a_version_registered_before_the_allowlist_is_still_recognised(workspace):
    """A manifest entry (and store copy) from before the allowlist that holds README.md: the same
    source, README.md included, is that version again, not a conflict."""
    ws = workspace
    src = ws.sources[MODEL] / "run1"
    vid = ws.cli("register", "--model", MODEL, "--cycle", "1", check=0).stdout.strip()
    (src / "README.md").write_text("# model card\n")
    stored = ws.store / MODEL / vid
    os.chmod(stored, 0o755)
    (stored / "README.md").write_text("# model card\n")
    path = ws.store / "manifest.json"
    doc = json.loads(path.read_text())
    doc["versions"][MODEL][0]["files"]["README.md"] = hashlib.sha256(b"# model card\n").hexdigest()
    path.write_text(json.dumps(doc, indent=2))
    proc = ws.cli("register", "--model", MODEL, "--cycle", "2", check=0)
    assert proc.stdout.strip() == vid and "already registered" in proc.stderr
    assert "not shipped: README.md (13 B)" in proc.stderr
