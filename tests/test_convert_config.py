"""Convert phase, fast: its config keys, spec precedence, planning as data, and the numpy-only MLX
adapter path through the real CLI on local endpoints (torch, mlx and llama_cpp blocked).

The heavy conversions (fidelity, GGUF) over SSH are in test_convert_deploy.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, TRANSLATOR, Workspace, assert_one_line_error, tree_digest
from safetensors.numpy import load_file, save_file

from adapterctl.config import BaseGguf, ConvertSetting, load_config
from adapterctl.convert import QUANT_TYPES, ConvertSpec, check_quant, spec_for
from adapterctl.demo import make_adapter
from adapterctl.errors import ConfigError
from adapterctl.plan import Target, plan_convert

SHA = "ab" * 32
HEAVY = ("torch", "mlx", "mlx_lm", "llama_cpp", "transformers", "peft")
# imported by every CLI run of these tests: an import of a heavy package fails the run
BLOCKER = f"""\
import importlib.abc
import sys


class _NumpyOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is blocked: this test runs the numpy-only path")
        return None


sys.meta_path.insert(0, _NumpyOnly())
"""


# --- config ---------------------------------------------------------------------------------------

ENDPOINTS = """\
endpoints:
  mac:
    host: mac.lan
    adapter_dir: /srv/adapters
    kind: mlx
    reload_method: none
{mac}  rtx:
    host: rtx.lan
    adapter_dir: /srv/adapters
    kind: gguf
    reload_method: none
{rtx}models:
  x:
    source: ./runs/x
{model}"""


def yaml_text(model: str = "", mac: str = "", rtx: str = "") -> str:
    """A config with a remote mlx endpoint `mac`, a remote gguf endpoint `rtx` and model `x`;
    each argument is lines appended to that section (indented as its keys)."""
    return ENDPOINTS.format(model=model, mac=mac, rtx=rtx)


def load(tmp_path: Path, text: str):
    path = tmp_path / "adapterctl.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def line_of(text: str, needle: str) -> int:
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if needle in row]
    return line


def config_error(tmp_path: Path, text: str, key: str, needle: str) -> str:
    """Load `text`, expect a ConfigError on the line holding `needle` at `key`; the full one-line text."""
    path = tmp_path / "adapterctl.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    full = str(e.value)
    assert "\n" not in full
    assert e.value.message.startswith(f"{path}:{line_of(text, needle)}: {key}: "), e.value.message
    return full


def test_convert_peft_as_one_string_applies_to_both_kinds(tmp_path):
    cfg = load(tmp_path, yaml_text(model="    convert: peft\n"))
    assert cfg.models["x"].convert == {"mlx": ConvertSetting("peft"), "gguf": ConvertSetting("peft")}
    for ep in ("mac", "rtx"):
        spec = spec_for(cfg.models["x"], cfg.endpoints[ep])
        assert spec.passthrough and spec.quant is None and spec.label == "PEFT as is"


def test_one_string_must_be_a_format_of_every_kind(tmp_path):
    text = yaml_text(model="    convert: adapter\n")
    full = config_error(tmp_path, text, "models.x.convert", "convert: adapter")
    assert "format 'adapter' is not one for kind gguf; expected one of: merged, lora, peft" in full


def test_per_kind_mapping_of_strings_and_settings(tmp_path):
    model = "    convert:\n      mlx: fused\n      gguf: {format: merged, quant: q5_k_m, fidelity: false}\n"
    cfg = load(tmp_path, yaml_text(model=model))
    assert cfg.models["x"].convert == {
        "mlx": ConvertSetting("fused"),
        "gguf": ConvertSetting("merged", "Q5_K_M", False),
    }


@pytest.mark.parametrize(
    ("model", "key", "needle", "expected"),
    [
        ("    convert:\n      mlx: merged\n", "models.x.convert.mlx", "mlx: merged", "adapter, fused, peft"),
        (
            "    convert:\n      gguf: {format: adapter}\n",
            "models.x.convert.gguf.format",
            "gguf: {format",
            "merged, lora, peft",
        ),
    ],
)
def test_a_format_of_the_other_kind_is_refused_with_the_valid_ones(tmp_path, model, key, needle, expected):
    full = config_error(tmp_path, yaml_text(model=model), key, needle)
    assert f"expected one of: {expected}" in full


def test_endpoint_convert_is_checked_against_its_kind(tmp_path):
    text = yaml_text(mac="    convert: lora\n")
    full = config_error(tmp_path, text, "endpoints.mac.convert", "convert: lora")
    assert "format 'lora' is not one for kind mlx; expected one of: adapter, fused, peft" in full


def test_unknown_kind_under_a_models_convert(tmp_path):
    text = yaml_text(model="    convert:\n      cuda: peft\n")
    full = config_error(tmp_path, text, "models.x.convert.cuda", "cuda: peft")
    assert "unknown endpoint kind 'cuda'" in full and "mlx, gguf" in full


@pytest.mark.parametrize(
    ("model", "mac", "rtx", "key", "needle"),
    [
        (
            "    convert:\n      gguf: {format: lora, quant: Q8_0}\n",
            "",
            "",
            "models.x.convert.gguf.quant",
            "lora",
        ),
        (
            "    convert:\n      mlx: {format: adapter, quant: Q8_0}\n",
            "",
            "",
            "models.x.convert.mlx.quant",
            "adapter",
        ),
        ("", "", "    convert: {format: peft, quant: Q8_0}\n", "endpoints.rtx.convert.quant", "peft"),
    ],
)
def test_quant_is_only_for_format_merged(tmp_path, model, mac, rtx, key, needle):
    full = config_error(tmp_path, yaml_text(model, mac, rtx), key, f"format: {needle}")
    assert "only used with format: merged" in full


def test_quant_on_an_mlx_setting_without_format_is_refused(tmp_path):
    text = yaml_text(model="    convert:\n      mlx: {quant: Q8_0}\n")
    full = config_error(tmp_path, text, "models.x.convert.mlx.quant", "quant: Q8_0")
    assert "only used with format: merged" in full


def test_unknown_and_imatrix_only_quant_types_get_distinct_messages(tmp_path):
    unknown = config_error(
        tmp_path,
        yaml_text(model="    convert:\n      gguf: {format: merged, quant: Q4_K_X}\n"),
        "models.x.convert.gguf.quant",
        "Q4_K_X",
    )
    imatrix = config_error(
        tmp_path,
        yaml_text(rtx="    convert:\n      quant: IQ2_XS\n"),
        "endpoints.rtx.convert.quant",
        "IQ2_XS",
    )
    assert "quant type 'Q4_K_X' is not a llama.cpp file type" in unknown
    assert "quant type 'IQ2_XS' needs an importance matrix, which adapterctl does not build" in imatrix
    assert "importance matrix" not in unknown and "not a llama.cpp file type" not in imatrix
    for full in (unknown, imatrix):  # the hint lists what works
        assert "use one of: F32, F16, BF16, Q8_0" in full


def test_quant_is_case_insensitive(tmp_path):
    cfg = load(tmp_path, yaml_text(model="    convert:\n      gguf: {quant: q4_k_m}\n"))
    assert cfg.models["x"].convert["gguf"].quant == "Q4_K_M"
    assert [check_quant(q.lower()) for q in QUANT_TYPES] == list(QUANT_TYPES)


def test_base_gguf_sha256_must_be_64_hex_digits_and_is_kept_lowercase(tmp_path):
    lora = "    convert: lora\n    base_gguf:\n      path: /models/base.gguf\n      sha256: {sha}\n"
    for bad in ("abc123", "g" * 64, "ab" * 32 + "0"):
        full = config_error(
            tmp_path, yaml_text(rtx=lora.format(sha=bad)), "endpoints.rtx.base_gguf.sha256", "sha256:"
        )
        assert "must be a sha256 (64 hex digits)" in full
    cfg = load(tmp_path, yaml_text(rtx=lora.format(sha=SHA.upper())))
    assert cfg.endpoints["rtx"].base_gguf == BaseGguf("/models/base.gguf", SHA)
    assert cfg.endpoints["rtx"].convert == ConvertSetting("lora")


@pytest.mark.parametrize("path", ["models/base.gguf", "~/models/base.gguf"])
def test_base_gguf_path_must_be_absolute_on_a_remote_host(tmp_path, path):
    rtx = f"    base_gguf: {{path: {path}, sha256: {SHA}}}\n"
    full = config_error(tmp_path, yaml_text(rtx=rtx), "endpoints.rtx.base_gguf.path", "base_gguf:")
    assert f"'{path}' must be an absolute path on the endpoint" in full


def test_base_gguf_path_of_a_local_endpoint_is_taken_from_the_config_dir(tmp_path):
    text = yaml_text(rtx=f"    base_gguf: {{path: models/base.gguf, sha256: {SHA}}}\n")
    text = text.replace("host: rtx.lan", "host: local")
    cfg = load(tmp_path, text)
    assert cfg.endpoints["rtx"].base_gguf.path == str(tmp_path / "models" / "base.gguf")


def test_base_gguf_is_only_for_kind_gguf(tmp_path):
    text = yaml_text(mac=f"    base_gguf: {{path: /models/base.gguf, sha256: {SHA}}}\n")
    full = config_error(tmp_path, text, "endpoints.mac.base_gguf", "base_gguf:")
    assert "only used when kind is gguf" in full


def test_endpoint_format_lora_needs_base_gguf(tmp_path):
    text = yaml_text(rtx="    convert: {format: lora}\n")
    full = config_error(tmp_path, text, "endpoints.rtx.base_gguf", "convert: {format: lora}")
    assert "required with format: lora" in full


def test_spec_for_takes_the_endpoint_then_the_models_kind_then_the_default(tmp_path):
    model = "    convert:\n      mlx: {format: fused, fidelity: false}\n      gguf: {quant: q8_0}\n"
    endpoints = {
        "mac-peft": ("mlx", "    convert: peft\n"),
        "mac-fid": ("mlx", "    convert: {fidelity: true}\n"),
        "rtx-q": ("gguf", "    convert: {format: merged, quant: Q2_K}\n"),
        "rtx-lora": ("gguf", f"    convert: lora\n    base_gguf: {{path: /b.gguf, sha256: {SHA}}}\n"),
    }
    extra = "".join(
        f"  {name}:\n    host: h\n    adapter_dir: /a\n    kind: {kind}\n    reload_method: none\n{keys}"
        for name, (kind, keys) in endpoints.items()
    )
    text = yaml_text(model=model, rtx=extra) + "  y:\n    source: ./runs/y\n"
    cfg = load(tmp_path, text)
    x, y, eps = cfg.models["x"], cfg.models["y"], cfg.endpoints
    assert spec_for(x, eps["mac"]) == ConvertSpec("mlx", "fused", None, False)  # the model's, per kind
    assert spec_for(x, eps["mac-peft"]) == ConvertSpec("mlx", "peft", None, False)
    assert spec_for(x, eps["mac-fid"]) == ConvertSpec("mlx", "fused", None, True)  # field by field
    assert spec_for(x, eps["rtx"]) == ConvertSpec("gguf", "merged", "Q8_0", True)
    assert spec_for(x, eps["rtx-q"]) == ConvertSpec("gguf", "merged", "Q2_K", True)
    assert spec_for(x, eps["rtx-lora"]) == ConvertSpec("gguf", "lora", None, True)  # quant is merged's
    assert spec_for(y, eps["mac"]) == ConvertSpec("mlx", "adapter", None, True)
    assert spec_for(y, eps["rtx"]) == ConvertSpec("gguf", "merged", "Q4_K_M", True)


# --- planning, as data ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_convert_is_data_and_writes_nothing(tmp_path):
    adapter = make_adapter(tmp_path / "store" / "x" / "v1", seed=3)
    files = {p.name: _sha256(p) for p in adapter.iterdir()}
    size = sum(p.stat().st_size for p in adapter.iterdir())
    text = yaml_text(model="    convert:\n      mlx: {fidelity: false}\n", rtx="    convert: peft\n")
    cfg = load(tmp_path, text.replace("models:\n", "store: ./store\nmodels:\n"))
    before = tree_digest(tmp_path)
    target = Target("x", "cycle1_20260101_00000000", files, size, adapter)
    plan = plan_convert(cfg, "d1", [target], ["mac", "rtx"])
    mac, rtx = plan.steps
    assert (mac.endpoint, mac.phase, mac.action) == ("mac", "convert", "convert")
    assert mac.spec == ConvertSpec("mlx", "adapter", None, False)
    assert len(mac.key) == 32 and mac.base_dir is None
    assert "MLX adapter — will run: PEFT → mlx_lm adapter layout" in mac.summary
    assert "no fidelity check" in mac.summary
    assert rtx.key is None and rtx.spec.passthrough
    assert "the PEFT files are shipped as they are" in rtx.summary
    assert tree_digest(tmp_path) == before


# --- the numpy-only MLX adapter path, through the real CLI ------------------------------------------


def make_base(path: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 100) -> Path:
    """A base model directory in Hugging Face layout whose attention weights fit make_adapter's LoRA
    (hidden 64, layers 0..1, q_proj/v_proj); zeros, since only the shapes are read."""
    path.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tensors = {"model.embed_tokens.weight": np.zeros((vocab, hidden), np.float32)}
    for n in range(layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{n}.self_attn.{module}.weight"] = np.zeros((hidden, hidden), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def configure(
    ws: Workspace,
    *,
    base_dir: Path | None,
    convert: str | None,
    suite: str = "none",
    mac: list[str] | None = None,
) -> None:
    """Rewrite the workspace config: gemma_4b alone, with `base_dir` and `convert` (YAML flow text);
    `mac`: mac-dev's reload lines (default reload_method: none)."""
    lines = [
        "store: ./adapters",
        "endpoints:",
        "  mac-dev:",
        "    host: local",
        '    adapter_dir: "./endpoints/mac dev é/adapters"',
        "    kind: mlx",
        *(mac or ["    reload_method: none"]),
        "  rtx-1:",
        "    host: local",
        '    adapter_dir: "./endpoints/rtx-1 ü/adapters"',
        "    kind: gguf",
        "    reload_method: none",
        "models:",
        f"  {MODEL}:",
        f'    source: "./training data/{MODEL}"',
        "    base_model: local/tiny-llama",
    ]
    if base_dir is not None:
        lines.append(f"    base_dir: {json.dumps(str(base_dir))}")
    if convert is not None:
        lines.append(f"    convert: {convert}")
    lines += ["    health:", f"      suite: {suite}"]
    if suite != "none":
        lines += ["      engine: command", f"      command: {json.dumps(TRANSLATOR)}", "      timeout_s: 20"]
    ws.config.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def numpy_only(workspace: Workspace, tmp_path: Path) -> Workspace:
    """The workspace, with every CLI run unable to import torch, mlx, llama_cpp, transformers, peft."""
    site = tmp_path / "numpy only"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    workspace.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return workspace


@pytest.fixture
def mlx_ws(numpy_only: Workspace) -> Workspace:
    """mac-dev gets an MLX adapter without a fidelity check (numpy only); no health suite, since the
    workspace's demo_translator reads PEFT files (see the next test)."""
    base = make_base(numpy_only.root / "base model ï")
    configure(numpy_only, base_dir=base, convert="{mlx: {format: adapter, fidelity: false}}")
    return numpy_only


def deploy(ws: Workspace, *endpoints: str, check: int | None = 0, extra: tuple[str, ...] = ()):
    return ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", *endpoints, *extra, check=check)


def manifest_entry(ws: Workspace) -> dict:
    [entry] = json.loads((ws.store / "manifest.json").read_text())["versions"][MODEL]
    return entry


def nothing_sent(ws: Workspace, *endpoints: str) -> None:
    for ep in endpoints:
        model_dir = ws.endpoints[ep] / MODEL
        assert not (model_dir / "releases").exists() and not (model_dir / "staging").exists(), ep


@pytest.mark.heavy
def test_dry_run_says_will_run_for_each_kind_and_leaves_the_workspace_byte_identical(mlx_ws):
    before = tree_digest(mlx_ws.root)
    proc = deploy(mlx_ws, "mac-dev", "rtx-1", extra=("--dry-run",))
    mac = next(line for line in proc.stdout.splitlines() if "convert for mlx" in line)
    rtx = next(line for line in proc.stdout.splitlines() if "convert for gguf" in line)
    assert "MLX adapter — will run: PEFT → mlx_lm adapter layout" in mac and "no fidelity check" in mac
    # gguf's default: merged Q4_K_M, which hashes the base: read, never written by a dry run
    assert "merged GGUF Q4_K_M — will run" in rtx and "base model ï" in rtx
    assert tree_digest(mlx_ws.root) == before
    assert not (mlx_ws.store / ".cache").exists()


@pytest.mark.heavy
def test_mlx_release_deployed_numpy_only_then_cached_then_a_damaged_entry_is_rebuilt(mlx_ws):
    proc = deploy(mlx_ws, "mac-dev")
    assert "fidelity not checked (fidelity: false in the config)" in proc.stderr
    entry = manifest_entry(mlx_ws)
    vid = entry["version_id"]
    assert mlx_ws.active("mac-dev") == vid

    # the release is the mlx_lm layout, with the manifest's artifact files and hashes
    [art] = entry["artifacts"].values()
    assert (art["format"], art["kind"], art["quant"]) == ("adapter", "mlx", None)
    assert sorted(art["files"]) == ["adapter_config.json", "adapters.safetensors"]
    release = mlx_ws.endpoints["mac-dev"] / MODEL / "releases" / vid
    assert sorted(p.name for p in release.iterdir()) == ["RELEASE.json", *sorted(art["files"])]
    assert {name: _sha256(release / name) for name in art["files"]} == art["files"]
    assert art["size_bytes"] == sum((release / name).stat().st_size for name in art["files"])
    assert art["tools"]["numpy"] == np.__version__ and "adapterctl-converter" in art["tools"]
    assert art["fidelity"] == {"checked": False, "reason": "fidelity: false in the config"}
    config = json.loads((release / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] | {"dropout": None} == {
        "rank": 8,
        "scale": 2.0,  # lora_alpha 16 / r 8
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        "dropout": None,
    }
    # mlx_lm's lora_a/lora_b are PEFT's lora_A/lora_B transposed, under names without the prefix
    peft = load_file(str(mlx_ws.store / MODEL / vid / "adapter_model.safetensors"))
    mlx = load_file(str(release / "adapters.safetensors"))
    assert len(mlx) == len(peft) == 8
    for layer in (0, 1):
        for module in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{module}"
            source = f"base_model.model.{name}"
            np.testing.assert_array_equal(mlx[f"{name}.lora_a"], peft[f"{source}.lora_A.weight"].T)
            np.testing.assert_array_equal(mlx[f"{name}.lora_b"], peft[f"{source}.lora_B.weight"].T)

    [line] = mlx_ws.log()
    assert (line["status"], line["convert"], line["version"]) == ("success", "built", vid)

    # `adapterctl convert` takes it from the cache, re-hashed
    again = mlx_ws.cli("convert", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    assert "convert for mlx: MLX adapter — cached" in again.stderr  # the plan says so
    assert "convert: MLX adapter cached" in again.stderr and "MLX adapter built" not in again.stderr
    assert "cached" in again.stdout

    # a flipped byte (same size) is caught by the hash: removed and rebuilt, never used
    cached = mlx_ws.store / ".cache" / "convert" / art["key"] / "adapters.safetensors"
    size = cached.stat().st_size
    os.chmod(cached, 0o644)
    with open(cached, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert _sha256(cached) != art["files"]["adapters.safetensors"]
    rebuilt = mlx_ws.cli("convert", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    assert "damaged (adapters.safetensors does not match its recorded sha256)" in rebuilt.stderr
    assert "rebuilding" in rebuilt.stderr and "rebuilt" in rebuilt.stdout
    assert _sha256(cached) == art["files"]["adapters.safetensors"]
    # convert runs through the same executor and is logged like every other command
    converts = [r for r in mlx_ws.log() if r["action"] == "convert"]
    assert [r["convert"] for r in converts][-1].startswith("rebuilt") and len(converts) == 2


@pytest.mark.heavy
def test_health_command_that_reads_peft_files_fails_an_mlx_release_and_active_is_untouched(numpy_only):
    """demo_translator reads adapter_model.safetensors, which an MLX release does not have."""
    base = make_base(numpy_only.root / "base")
    configure(
        numpy_only,
        base_dir=base,
        convert="{mlx: {format: adapter, fidelity: false}}",
        suite="translation_en_es",
    )
    proc = deploy(numpy_only, "mac-dev", check=4)
    assert "adapter_model.safetensors" in proc.stderr and "exit code 3" in proc.stderr
    assert numpy_only.active("mac-dev") is None
    [line] = numpy_only.log()
    assert (line["status"], line["convert"]) == ("aborted", "built")


@pytest.mark.heavy
def test_mlx_adapter_below_the_last_layer_is_padded_from_base_dir_even_without_fidelity(mlx_ws):
    base = make_base(mlx_ws.root / "four layers", layers=4)
    configure(mlx_ws, base_dir=base, convert="{mlx: {format: adapter, fidelity: false}}")
    deploy(mlx_ws, "mac-dev")
    vid = manifest_entry(mlx_ws)["version_id"]
    release = mlx_ws.endpoints["mac-dev"] / MODEL / "releases" / vid
    config = json.loads((release / "adapter_config.json").read_text())
    assert config["num_layers"] == 4 and config["adapterctl"]["padded_layers"] == [2, 3]


# --- refused before any transfer ------------------------------------------------------------------


@pytest.mark.heavy
def test_missing_base_dir_is_one_line_before_any_transfer(numpy_only):
    missing = numpy_only.root / "no such base"
    configure(numpy_only, base_dir=missing, convert=None)
    before = tree_digest(numpy_only.root)
    proc = deploy(numpy_only, "mac-dev", "rtx-1", check=2)
    assert_one_line_error(proc, str(missing), "does not exist")
    assert f"models.{MODEL}.base_dir" in proc.stderr
    nothing_sent(numpy_only, "mac-dev", "rtx-1")
    assert tree_digest(numpy_only.root) == before


@pytest.mark.heavy
def test_base_of_another_hidden_size_is_one_line_before_any_transfer(numpy_only):
    other = make_base(numpy_only.root / "other base", hidden=128)
    configure(numpy_only, base_dir=other, convert=None)
    before = tree_digest(numpy_only.root)
    proc = deploy(numpy_only, "mac-dev", "rtx-1", check=2)
    assert_one_line_error(proc, "does not match the adapter", "hidden_size 128", "128×128", "64×64")
    nothing_sent(numpy_only, "mac-dev", "rtx-1")
    assert tree_digest(numpy_only.root) == before


@pytest.mark.heavy
def test_gguf_default_without_base_dir_names_the_key_and_convert_peft(numpy_only):
    configure(numpy_only, base_dir=None, convert=None)
    before = tree_digest(numpy_only.root)
    proc = deploy(numpy_only, "rtx-1", check=2)
    assert_one_line_error(
        proc, "endpoint rtx-1 (kind gguf) gets a merged GGUF Q4_K_M", f"models.{MODEL}.base_dir"
    )
    assert "convert: peft" in proc.stderr
    nothing_sent(numpy_only, "rtx-1")
    assert tree_digest(numpy_only.root) == before


@pytest.mark.heavy
def test_model_level_lora_without_the_endpoints_base_gguf_is_one_line_before_any_transfer(numpy_only):
    base = make_base(numpy_only.root / "base")
    configure(numpy_only, base_dir=base, convert="{gguf: {format: lora, fidelity: false}}")
    proc = deploy(numpy_only, "rtx-1", check=2)
    assert_one_line_error(proc, "endpoint rtx-1: format lora needs base_gguf")
    assert "add base_gguf" in proc.stderr
    nothing_sent(numpy_only, "rtx-1")
    assert not (numpy_only.store / "manifest.json").exists()


# --- adapterctl convert -------------------------------------------------------------------------------


@pytest.mark.heavy
def test_convert_without_a_registered_version_names_register(workspace):
    proc = workspace.cli("convert", "--models", MODEL)
    assert_one_line_error(proc, f"model {MODEL} has no registered version to convert")
    assert f"adapterctl register --model {MODEL} --cycle N" in proc.stderr
    assert not workspace.store.exists() or not any(workspace.store.iterdir())


def test_base_model_that_names_a_directory_here_is_the_base_dir(tmp_path):
    (tmp_path / "models" / "tiny base").mkdir(parents=True)
    text = yaml_text(model='    base_model: "./models/tiny base"\n')
    cfg = load(tmp_path, text)
    assert cfg.models["x"].base_dir == tmp_path / "models" / "tiny base"
    (tmp_path / "other").mkdir()
    named = load(tmp_path / "other", yaml_text(model="    base_model: google/gemma-3-4b-it\n"))
    assert named.models["x"].base_dir is None  # a hub name is a name, never a download


@pytest.mark.heavy
def test_prune_keeps_the_newest_keep_releases_versions_and_live_builds(mlx_ws):
    """keep_releases 2 (the workspace's default is 5): three cycles converted, the oldest entry goes;
    a dead run's scratch dir goes, a live one (this test's own pid) stays; dry run removes nothing."""
    cfg = mlx_ws.config.read_text(encoding="utf-8")
    mlx_ws.config.write_text("keep_releases: 2\n" + cfg, encoding="utf-8")
    keys = []
    for cycle, seed in ((1, 1), (2, 2), (3, 3)):
        if cycle > 1:
            mlx_ws.new_adapter(MODEL, f"run{cycle}", seed=seed)
        mlx_ws.cli("register", "--model", MODEL, "--cycle", str(cycle), check=0)
        mlx_ws.cli("convert", "--models", MODEL, "--endpoints", "mac-dev", check=0)
        entries = json.loads((mlx_ws.store / "manifest.json").read_text())["versions"][MODEL]
        [key] = entries[-1]["artifacts"]
        keys.append(key)
    root = mlx_ws.store / ".cache" / "convert"
    dead = root / f".{keys[0]}.tmp-999999999"
    live = root / f".{keys[1]}.tmp-{os.getpid()}"
    for scratch in (dead, live):
        (scratch / "out").mkdir(parents=True)
    before = tree_digest(mlx_ws.store)
    dry = mlx_ws.cli("convert", "--prune", "--dry-run", check=0).stdout
    assert f"would remove {keys[0]}" in dry and dead.name in dry and "would remove 2 cache entries" in dry
    assert tree_digest(mlx_ws.store) == before
    mlx_ws.cli("convert", "--prune", check=0)
    assert sorted(p.name for p in root.iterdir()) == sorted([keys[1], keys[2], live.name])
    again = mlx_ws.cli("convert", "--models", MODEL, "--endpoints", "mac-dev", check=0)
    assert "cached" in again.stdout  # the newest version's entry was kept


@pytest.mark.heavy
def test_sigusr1_reload_of_an_mlx_release_is_confirmed_with_the_versions_sha(mlx_ws):
    """The serving helper verifies and reports a converted release (no adapter_model.safetensors in it)
    under the version's identity, so adapterctl confirms the reload against the manifest."""
    base = make_base(mlx_ws.root / "base for reload")
    reload = ["    reload_method: sigusr1", "    pidfile: ../run/serve.pid", "    reload_timeout_s: 10"]
    configure(mlx_ws, base_dir=base, convert="{mlx: {format: adapter, fidelity: false}}", mac=reload)
    server = mlx_ws.start_server("mac-dev")
    deploy(mlx_ws, "mac-dev")
    entry = manifest_entry(mlx_ws)
    loaded = json.loads((mlx_ws.endpoints["mac-dev"].parent / "run" / "loaded.json").read_text())
    assert server.poll() is None
    assert loaded["version_id"] == entry["version_id"] and loaded["sha256"] == entry["sha256"]
    [line] = mlx_ws.log()
    assert (line["status"], line["convert"]) == ("success", "built")


@pytest.mark.heavy
def test_conversion_runs_before_the_endpoint_is_locked(mlx_ws):
    """A conversion can take minutes on a real model: the endpoint is not held locked meanwhile."""
    plan = json.loads(deploy(mlx_ws, "mac-dev", extra=("--dry-run", "--json")).stdout)
    actions = [s["action"] for s in plan["steps"] if s["endpoint"] == "mac-dev"]
    assert actions[:3] == ["convert", "lock", "transfer"] and actions[-1] == "unlock"
