"""Issue 6 end to end: the tiny model's adapter converted per endpoint kind and deployed over real SSH.

mac-1 (kind mlx, BSD-like userland) gets an mlx_lm adapter, linux-1 (kind gguf) a merged GGUF
quantized to Q4_K_M, linux-2 (kind gguf) a GGUF LoRA on a base GGUF it keeps. Health checks run
on the endpoints with the converted artifacts (`engine: auto`: mlx_lm or llama-cpp-python).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import Workspace, assert_one_line_error
from test_ssh import SSHWorkspace, sha256

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")
llama_cpp = pytest.importorskip("llama_cpp")

from adapterctl import tinymodel  # noqa: E402
from adapterctl.convert import gguf as gguf_convert  # noqa: E402

pytestmark = pytest.mark.heavy
MODEL = "tiny"
KINDS = {"mac-1": "mlx", "linux-1": "gguf", "linux-2": "gguf"}


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """The tiny model's base (copied under a path with a space), its adapters, a second good adapter
    (lora_B scaled, a "new cycle"), and the base converted to GGUF by llama.cpp's own converter
    (what a gguf LoRA endpoint keeps)."""
    tiny = tinymodel.build()
    root = tmp_path_factory.mktemp("tiny parts")
    base = root / "base model"
    shutil.copytree(tiny.base_dir, base)
    good2 = root / "good2"
    shutil.copytree(tiny.good_adapter, good2)
    _scale_lora_b(good2 / "adapter_model.safetensors", 0.97)
    base_gguf = root / "base.gguf"
    tools = gguf_convert.tools_dir()
    subprocess.run(
        [
            sys.executable,
            str(tools / "convert_hf_to_gguf.py"),
            str(base),
            "--outtype",
            "f16",
            "--outfile",
            str(base_gguf),
        ],
        env={**os.environ, "PYTHONPATH": str(tools / "gguf-py"), "NO_LOCAL_GGUF": "1"},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {
        "base": base,
        "good": tiny.good_adapter,
        "bad": tiny.bad_adapter,
        "good2": good2,
        "base_gguf": base_gguf,
    }


def _scale_lora_b(path: Path, factor: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    save_file(
        {k: (v * factor).astype(v.dtype) if ".lora_B." in k else v for k, v in tensors.items()}, str(path)
    )


def _config(
    root: Path, dirs: dict[str, Path], base: Path, *, extra_model: str = "", extra_eps: dict | None = None
) -> Path:
    eps = ""
    for name in dirs:
        eps += f'  {name}:\n    host: {name}\n    adapter_dir: "{dirs[name]}"\n'
        eps += f"    kind: {KINDS[name]}\n    reload_method: none\n"
        eps += (extra_eps or {}).get(name, "")
    text = f"""\
store: ./adapters
endpoints:
{eps}models:
  {MODEL}:
    source: ./training/{MODEL}
    base_model: local/tiny-llama
    base_dir: "{base}"
{extra_model}    health:
      suite: translation_en_es
      engine: auto
      base: "{base}"
      python: "{sys.executable}"
      timeout_s: 120
"""
    cfg = root / "adapterctl.yaml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


@pytest.fixture
def ws(tmp_path, ssh_hosts, tiny_parts):
    root = tmp_path / "convert wörk"
    root.mkdir()
    tag = f"t-{uuid.uuid4().hex[:12]}"
    dirs = {alias: ssh_hosts.hosts[alias].root / tag / "adapters" for alias in KINDS}
    for d in dirs.values():  # set up like a real endpoint: adapter_dir's parent exists (it is never created)
        d.parent.mkdir(parents=True, exist_ok=True)
    w = SSHWorkspace(
        root=root,
        config=_config(root, dirs, tiny_parts["base"]),
        store=root / "adapters",
        sources={MODEL: root / "training" / MODEL},
        endpoints=dirs,
        env={**ssh_hosts.env(), "ADAPTERCTL_LLAMA_CPP_TOOLS": str(gguf_convert.tools_dir())},
    )
    w.ssh_config = ssh_hosts.ssh_config
    w.hosts = ssh_hosts
    w.parts = tiny_parts
    w.dirs = dirs
    add_run(w, "run1", tiny_parts["good"])
    try:
        yield w
    finally:
        for d in dirs.values():
            shutil.rmtree(d.parent, ignore_errors=True)


def add_run(w: Workspace, run: str, adapter: Path) -> Path:
    dest = w.sources[MODEL] / run
    shutil.copytree(adapter, dest)
    newest = max((p / "adapter_model.safetensors").stat().st_mtime for p in w.sources[MODEL].iterdir())
    os.utime(dest / "adapter_model.safetensors", (newest + 1, newest + 1))
    return dest


def deploy(w: SSHWorkspace, cycle: int, *endpoints: str, check: int | None = 0, extra=()):
    return w.cli(
        "deploy", "--cycle", str(cycle), "--models", MODEL, "--endpoints", *endpoints, *extra, check=check
    )


def artifact_for(w: SSHWorkspace, version: str, fmt: str) -> dict:
    entry = next(v for v in w.manifest()["versions"][MODEL] if v["version_id"] == version)
    [art] = [a for a in entry["artifacts"].values() if a["format"] == fmt]
    return art


def release_holds(w: SSHWorkspace, endpoint: str, version: str, files: dict) -> None:
    rel = w.release(endpoint, version, MODEL)
    meta = json.loads((rel / "RELEASE.json").read_text())
    assert meta["files"] == files
    assert sorted(p.name for p in rel.iterdir()) == sorted([*files, "RELEASE.json"])
    for name, digest in files.items():
        assert sha256(rel / name) == digest


def log_of(w: SSHWorkspace, endpoint: str) -> list[dict]:
    return [e for e in w.log() if e.get("endpoint") == endpoint and e.get("action") == "deploy"]


def test_each_kind_gets_its_own_format_checked_there_and_a_redeploy_converts_and_sends_nothing(ws):
    proc = deploy(ws, 1, "mac-1", "linux-1")
    vid = ws.vid(1, MODEL)
    mlx = artifact_for(ws, vid, "adapter")
    merged = artifact_for(ws, vid, "merged")
    assert sorted(mlx["files"]) == ["adapter_config.json", "adapters.safetensors"]
    assert sorted(merged["files"]) == ["model.gguf"] and merged["quant"] == "Q4_K_M"
    release_holds(ws, "mac-1", vid, mlx["files"])
    release_holds(ws, "linux-1", vid, merged["files"])
    for art in (mlx, merged):  # fidelity recorded next to the artifact
        assert art["fidelity"]["checked"] is True
        assert all(r["suite_passed"] for r in art["fidelity"]["results"])
    assert mlx["fidelity"]["results"][0]["token_agreement"] == 1.0
    for ep in ("mac-1", "linux-1"):
        [entry] = log_of(ws, ep)
        assert entry["status"] == "success" and entry["convert"] == "built"
        assert entry["health_check_results"]["pre_activation"]["all_passed"] is True
        assert ws.active(ep, MODEL) == vid
    assert "fidelity" in proc.stderr

    # the same version again, to a release that is there but not active: cache hit, 0 bytes
    ws.cli("rollback", "--endpoints", "linux-1", "--models", MODEL, "--to", "base", check=0)
    dry = ws.cli("deploy", "--version", vid, "--endpoints", "linux-1", "--dry-run", check=0).stdout
    assert "cached" in dry and "0 bytes to send" in dry
    ws.cli("deploy", "--version", vid, "--endpoints", "linux-1", check=0)
    entry = log_of(ws, "linux-1")[-1]
    assert entry["convert"] == "cached" and entry["bytes_sent"] == 0 and entry["status"] == "success"


def test_a_fused_mlx_model_is_the_release_and_passes_there(ws):
    _config(ws.root, ws.dirs, ws.parts["base"], extra_eps={"mac-1": "    convert: fused\n"})
    proc = deploy(ws, 1, "mac-1")
    vid = ws.vid(1, MODEL)
    art = artifact_for(ws, vid, "fused")
    assert {"config.json", "model.safetensors"} <= set(art["files"]) and "adapters.safetensors" not in art[
        "files"
    ]
    release_holds(ws, "mac-1", vid, art["files"])
    assert art["fidelity"]["results"][0]["token_agreement"] == 1.0
    assert "convert: fused MLX model built" in proc.stderr
    [entry] = log_of(ws, "mac-1")
    assert entry["health_check_results"]["pre_activation"]["all_passed"] is True
    # deploying the active version again: nothing converted or sent, and the plan says why
    again = deploy(ws, 1, "mac-1")
    assert "already active" in again.stdout and "fused MLX model cached" in again.stdout


def test_a_damaged_cache_entry_is_rebuilt_never_shipped(ws):
    ws.cli("register", "--model", MODEL, "--cycle", "1", check=0)
    vid = ws.vid(1, MODEL)
    first = ws.cli("convert", "--models", MODEL, "--endpoints", "linux-1", check=0)
    assert "built" in first.stdout + first.stderr
    art = artifact_for(ws, vid, "merged")
    cached = ws.store / ".cache" / "convert" / art["key"] / "model.gguf"
    size = cached.stat().st_size
    os.chmod(cached, 0o644)
    with open(cached, "r+b") as f:  # truncate: a crash mid-write, a full disk
        f.truncate(size // 2)
    proc = deploy(ws, 1, "linux-1")
    assert "damaged" in proc.stderr and "rebuilding" in proc.stderr
    assert cached.stat().st_size == size
    release_holds(ws, "linux-1", vid, art["files"])
    # a flipped byte (same size) is caught by the hash
    with open(cached, "r+b") as f:
        f.seek(size // 3)
        byte = f.read(1)
        f.seek(size // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = ws.cli("convert", "--models", MODEL, "--endpoints", "linux-1", check=0)
    assert "does not match its recorded sha256" in again.stderr
    assert sha256(cached) == art["files"]["model.gguf"]


def test_gguf_lora_on_the_endpoints_base_and_a_base_that_does_not_match_is_refused(ws):
    base_gguf = ws.parts["base_gguf"]
    good_sha = sha256(base_gguf)
    kept = ws.dirs["linux-2"].parent / "models" / "base.gguf"
    kept.parent.mkdir(parents=True)
    shutil.copy2(base_gguf, kept)
    lora = f'    convert: lora\n    base_gguf: {{path: "{kept}", sha256: {good_sha}}}\n'
    _config(ws.root, ws.dirs, ws.parts["base"], extra_eps={"linux-2": lora})
    deploy(ws, 1, "linux-2")
    vid = ws.vid(1, MODEL)
    art = artifact_for(ws, vid, "lora")
    release_holds(ws, "linux-2", vid, art["files"])
    assert list(art["files"]) == ["adapter.gguf"]
    assert log_of(ws, "linux-2")[-1]["health_check_results"]["pre_activation"]["all_passed"] is True
    # the base GGUF's sha256 is recorded there by size+mtime+inode: the next plan does not re-hash it
    hashes = json.loads((ws.dirs["linux-2"] / ".base-gguf-hashes.json").read_text())
    assert hashes[str(kept)]["sha256"] == good_sha
    add_run(ws, "run3", ws.parts["good2"])
    plan = json.loads(deploy(ws, 3, "linux-2", extra=("--dry-run", "--json")).stdout)
    assert "remember_base_gguf" not in [step["action"] for step in plan["steps"]]
    shutil.rmtree(ws.sources[MODEL] / "run3")

    # the file there is no longer the configured base: refused before anything is sent
    with open(kept, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    add_run(ws, "run2", ws.parts["good2"])
    proc = deploy(ws, 2, "linux-2", check=2)
    assert_one_line_error(proc, "base GGUF")
    assert not (ws.dirs["linux-2"] / MODEL / "staging").exists() or not any(
        (ws.dirs["linux-2"] / MODEL / "staging").iterdir()
    )


def _nothing_sent(ws: SSHWorkspace) -> None:
    for d in ws.dirs.values():
        assert not (d / MODEL / "releases").exists() and not (d / MODEL / "staging").exists()


def test_missing_base_model_is_one_line_before_any_transfer(ws):
    _config(ws.root, ws.dirs, ws.root / "no such base")
    proc = deploy(ws, 1, "linux-1", check=2)
    assert_one_line_error(proc, "no such base")
    _nothing_sent(ws)


def test_mismatched_base_is_one_line_before_any_transfer(ws, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other base"
    cfg = json.loads((ws.parts["base"] / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256)
    model = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    )
    model.save_pretrained(str(other))
    _config(ws.root, ws.dirs, other)
    proc = deploy(ws, 1, "mac-1", "linux-1", check=2)
    assert_one_line_error(proc, "does not match the adapter")
    assert "hidden_size 128" in proc.stderr
    _nothing_sent(ws)


def test_unknown_quant_type_is_one_line_before_any_transfer(ws):
    _config(
        ws.root,
        ws.dirs,
        ws.parts["base"],
        extra_model="    convert:\n      gguf: {format: merged, quant: Q4_K_X}\n",
    )
    proc = deploy(ws, 1, "linux-1", check=2)
    assert_one_line_error(proc, "Q4_K_X")
    assert "not a llama.cpp file type" in proc.stderr
    _nothing_sent(ws)


def test_new_cycle_of_a_merged_gguf_goes_as_a_delta(ws):
    """Only the tensors the LoRA touches change between cycles: rsync sends little more than them."""
    from adapterctl.formats.gguf import changed_tensor_bytes

    deploy(ws, 1, "linux-1")
    v1 = ws.vid(1, MODEL)
    add_run(ws, "run2", ws.parts["good2"])
    ws.cli("register", "--model", MODEL, "--cycle", "2", check=0)
    ws.cli("convert", "--models", MODEL, "--endpoints", "linux-1", check=0)
    v2 = ws.vid(2, MODEL)
    a1, a2 = artifact_for(ws, v1, "merged"), artifact_for(ws, v2, "merged")
    cache = ws.store / ".cache" / "convert"
    # same size and same mtime as the previous release's file: rsync's quick check must not skip it
    old_stat = (cache / a1["key"] / "model.gguf").stat()
    assert (cache / a2["key"] / "model.gguf").stat().st_size == old_stat.st_size
    os.utime(cache / a2["key"] / "model.gguf", ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    # a killed earlier attempt left a partial file: it must not become the delta's basis
    partial = ws.staging("linux-1", v2, MODEL) / ".rsync-partial" / "model.gguf"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(old_stat.st_size // 2))
    deploy(ws, 2, "linux-1")
    changed = changed_tensor_bytes(cache / a1["key"] / "model.gguf", cache / a2["key"] / "model.gguf")
    sent = log_of(ws, "linux-1")[-1]["bytes_sent"]
    full = a2["size_bytes"]
    print(f"\nmerged GGUF new cycle: sent {sent} bytes, changed tensors {changed} bytes, full file {full}")
    assert 0 < changed < full
    assert sent <= 1.2 * changed, (sent, changed, full)
    release_holds(ws, "linux-1", v2, a2["files"])
