"""The gguf builders (adapterctl.convert.gguf) on real parts: the tiny Llama + its good adapter, and a
384-wide random Llama + random LoRA whose rows do not fit llama.cpp's 256-wide k-quant blocks.

Needs llama-cpp-python and the converters scripts/build-llama-cpp-wheel extracts (skipped without
them), and the `model` extra (torch, transformers, peft) to merge. Builds are module-scoped: each
conversion runs once (~4 s each, mostly the converter's torch import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from adapterctl import tinymodel  # noqa: E402
from adapterctl.convert import Cache, ConversionError, ConvertSpec, Job, base_digest  # noqa: E402
from adapterctl.convert import gguf as convert_gguf  # noqa: E402
from adapterctl.convert import tools as convert_tools  # noqa: E402
from adapterctl.endpoint_ops import sha256_file  # noqa: E402
from adapterctl.formats import gguf as gguf_format  # noqa: E402

pytestmark = pytest.mark.heavy

FTYPE_F16, FTYPE_Q4_K_M = 1, 15  # llama_ftype values in general.file_type
LORA_TENSORS = {f"blk.{i}.attn_{m}.weight" for i in range(tinymodel.LAYERS) for m in ("q", "v")}


@dataclass
class Built:
    out: Path
    meta: dict[str, Any]
    lines: list[str]


@pytest.fixture(scope="module")
def tools() -> Path:
    try:
        return convert_tools.tools_dir()
    except ConversionError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def read(tools):
    """GGUFReader from the tools' own gguf-py (the version that wrote the files)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tools / "gguf-py"))
        from gguf import GGUFReader
    return GGUFReader


@pytest.fixture(scope="module")
def tiny() -> tinymodel.TinyModel:
    return tinymodel.build()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


def _job(
    store: Path, base_dir: Path, adapter_dir: Path, fmt: str = "merged", quant: str | None = None
) -> Job:
    files = {f.name: sha256_file(str(f)) for f in sorted(adapter_dir.iterdir()) if f.is_file()}
    spec = ConvertSpec("gguf", fmt, quant)
    return Job("tiny", "v1", spec, adapter_dir, files, base_dir, base_digest(base_dir, store))


def _build(builder, job: Job, store: Path) -> Built:
    """Call the builder the way convert.run does: `out` inside the cache's scratch directory."""
    out = Cache(store).scratch(job.key()) / "out"
    out.mkdir()
    lines: list[str] = []
    meta = builder(job, out, lines.append)
    print("\n" + "\n".join(lines))
    return Built(out, meta, lines)


def _tensors(read, path: Path) -> dict[str, Any]:
    return {t.name: t for t in read(str(path)).tensors}


def _file_type(read, path: Path) -> int:
    return int(read(str(path)).get_field("general.file_type").contents())


@pytest.fixture(scope="module")
def merged_q4(tiny, store) -> Built:
    return _build(
        convert_gguf.build_merged, _job(store, tiny.base_dir, tiny.good_adapter, quant="Q4_K_M"), store
    )


@pytest.fixture(scope="module")
def base_ggufs(tiny, tools, tmp_path_factory) -> dict[str, Path]:
    """The base alone, converted and quantized the same way (what the merged files are compared to)."""
    root = tmp_path_factory.mktemp("base-ggufs")
    paths = {"f16": root / "base-f16.gguf", "Q4_K_M": root / "base-Q4_K_M.gguf"}
    convert_gguf.convert_hf(tools, tiny.base_dir, paths["f16"], "f16", "base", name="tiny")
    convert_gguf.quantize(paths["f16"], paths["Q4_K_M"], "Q4_K_M", "base")
    return paths


@pytest.fixture(scope="module")
def wide_model(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """A random 384-wide Llama (1 layer) with the tiny tokenizer, and a random non-zero LoRA on it."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    root = tmp_path_factory.mktemp("wide")
    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tinymodel.VOCAB_SIZE,
        hidden_size=384,
        intermediate_size=768,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes from inside peft
        model.save_pretrained(str(base_dir))
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(adapter_dir))
    if bars:
        hf_logging.enable_progress_bar()
    for f in tiny.base_dir.iterdir():  # the converter needs a tokenizer; the tiny one fits vocab 512
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, base_dir / f.name)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    return base_dir, adapter_dir


def test_merged_q4_k_m_changes_only_the_tensors_the_lora_touches(merged_q4, base_ggufs, read):
    assert sorted(p.name for p in merged_q4.out.iterdir()) == ["model.gguf"]
    model = merged_q4.out / "model.gguf"
    assert _file_type(read, model) == FTYPE_Q4_K_M
    merged, base = _tensors(read, model), _tensors(read, base_ggufs["Q4_K_M"])
    assert merged.keys() == base.keys()
    assert {n: t.tensor_type for n, t in merged.items()} == {n: t.tensor_type for n, t in base.items()}
    changed = {n for n in merged if merged[n].data.tobytes() != base[n].data.tobytes()}
    # untouched tensors are byte-identical to a base-only conversion: rsync ships only the delta
    assert changed == LORA_TENSORS


def test_merged_q4_k_m_loads_and_translates_in_llama_cpp(merged_q4):
    english, spanish = tinymodel.PAIRS_ES[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapterctl.health.engine_llamacpp",
            "--gguf",
            str(merged_q4.out / "model.gguf"),
        ],
        input=english + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == spanish


def test_merged_reports_stages_and_keeps_the_unquantized_gguf_for_fidelity(merged_q4, read, tools):
    meta = merged_q4.meta
    assert [line.split(" in ")[0] for line in merged_q4.lines] == [
        "merged LoRA into base (float32)",
        "HF→GGUF f16",
        "quantized to Q4_K_M",
    ]
    assert meta["fallbacks"] == []  # 256-wide: every row fits the k-quant blocks
    unquantized = Path(meta["_paths"]["unquantized_gguf"])
    assert unquantized.parent == merged_q4.out.parent and _file_type(read, unquantized) == FTYPE_F16
    assert meta["converter"]["llama_cpp_python"] == convert_gguf.llama_cpp_version()
    assert str(tools) not in json.dumps(meta["converter"])  # the same tools anywhere give the same meta


def test_merged_f16_is_converted_but_not_quantized(merged_q4, base_ggufs, tiny, store, read):
    built = _build(
        convert_gguf.build_merged, _job(store, tiny.base_dir, tiny.good_adapter, quant="F16"), store
    )
    model = built.out / "model.gguf"
    assert sorted(p.name for p in built.out.iterdir()) == ["model.gguf"]
    assert not any("quantized" in line for line in built.lines)
    assert built.meta["fallbacks"] == [] and built.meta["_paths"]["unquantized_gguf"] == str(model)
    assert _file_type(read, model) == FTYPE_F16
    merged = _tensors(read, model)
    # the same bytes as the f16 the Q4_K_M build quantized (conversion is deterministic)
    q4_source = _tensors(read, Path(merged_q4.meta["_paths"]["unquantized_gguf"]))
    assert all(merged[n].data.tobytes() == q4_source[n].data.tobytes() for n in merged)
    base = _tensors(read, base_ggufs["f16"])
    assert {n for n in merged if merged[n].data.tobytes() != base[n].data.tobytes()} == LORA_TENSORS


def test_fallbacks_name_the_tensors_whose_rows_do_not_fit_256(wide_model, store, read):
    base_dir, adapter_dir = wide_model
    built = _build(convert_gguf.build_merged, _job(store, base_dir, adapter_dir, quant="Q4_K_M"), store)
    fallbacks = built.meta["fallbacks"]
    tensors = _tensors(read, built.out / "model.gguf")
    assert {
        "tensor": "blk.0.attn_q.weight",
        "wanted": "q4_K",
        "used": "q5_0",
        "ncols": 384,
        "block": 256,
    } in (fallbacks)
    for f in fallbacks:  # real tensors, stored in the type llama.cpp said it used
        assert tensors[f["tensor"]].tensor_type.name.lower() == f["used"].lower()
        assert f["ncols"] == 384 and f["wanted"] in ("q4_K", "q6_K")
    # blk.0.ffn_down.weight has 768-wide rows (divisible by 256): it keeps its k-quant
    assert "blk.0.ffn_down.weight" not in {f["tensor"] for f in fallbacks}
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name in ("Q4_K", "Q6_K")
    summary = [line for line in built.lines if "fell back" in line]
    assert len(summary) == 1 and summary[0].startswith(f"{len(fallbacks)} tensors fell back from q4_K")
    assert "blk.0.attn_q.weight" in summary[0] or "more" in summary[0]


def test_lora_writes_adapter_gguf_and_reuses_the_cached_base_gguf(tiny, store, tools, read):
    job = _job(store, tiny.base_dir, tiny.good_adapter, fmt="lora")
    first = _build(convert_gguf.build_lora, job, store)
    assert sorted(p.name for p in first.out.iterdir()) == ["adapter.gguf"]
    lora = _tensors(read, first.out / "adapter.gguf")
    assert {n.rsplit(".", 1)[-1] for n in lora} == {"lora_a", "lora_b"}
    assert {n.rsplit(".", 1)[0] for n in lora} == LORA_TENSORS
    base = Path(first.meta["_paths"]["base_gguf"])
    version = convert_gguf.llama_cpp_version()
    assert base == store / ".cache" / "convert" / f"base-gguf-{job.base_digest[:16]}-{version}" / "base.gguf"
    assert first.meta["base_gguf_sha256"] == sha256_file(str(base))
    assert _file_type(read, base) == FTYPE_F16
    mtime = base.stat().st_mtime_ns

    second = _build(convert_gguf.build_lora, job, store)
    assert second.meta["base_gguf_sha256"] == first.meta["base_gguf_sha256"]
    assert base.stat().st_mtime_ns == mtime
    assert any(line.startswith("base GGUF: reusing") for line in second.lines)

    base.write_bytes(base.read_bytes()[:-1000])  # truncated: the recorded sha256 no longer matches
    lines: list[str] = []
    path, sha = convert_gguf.base_gguf(job, store / ".cache" / "convert", tools, lines.append)
    assert path == base and sha == first.meta["base_gguf_sha256"] == sha256_file(str(base))
    assert "damaged (sha256 mismatch): rebuilding" in lines[0]


def test_converter_failure_names_model_version_and_script(tiny, store, tmp_path):
    adapter = tmp_path / "broken"
    shutil.copytree(tiny.good_adapter, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(ConversionError) as info:
        _build(convert_gguf.build_lora, _job(store, tiny.base_dir, adapter, fmt="lora"), store)
    message = info.value.message
    print(message)
    assert message.startswith("model tiny v1: llama.cpp's convert_lora_to_gguf.py failed (exit 1)")
    assert (
        "its stderr ends:\n  " in message and len(message.splitlines()) <= 1 + convert_gguf.STDERR_TAIL_LINES
    )


def test_missing_tools_dir_is_a_conversion_error_naming_the_fix(monkeypatch, tmp_path, tiny, store):
    monkeypatch.setenv(convert_tools.TOOLS_ENV, str(tmp_path))
    with pytest.raises(ConversionError) as info:
        convert_tools.tools_dir()
    text = str(info.value)
    assert str(tmp_path) in text and "convert_hf_to_gguf.py" in text
    assert "pip install -e '.[gguf]'" in text and "scripts/build-llama-cpp-wheel" in text
    assert "\n" not in text
    with pytest.raises(ConversionError):  # before any merging work
        convert_gguf.build_merged(_job(store, tiny.base_dir, tiny.good_adapter), tmp_path / "out", print)


def test_parse_fallbacks_reads_llama_cpps_lines():
    log = (
        "llama_model_loader: - type  f16:    9 tensors\n"
        "warning: blk.0.attn_v.weight                  - ncols    384 not divisible by 256 "
        "(required for type    q6_K) -> falling back to    q8_0\n"
        "warning: blk.3.ffn_down.weight                - ncols     40 not divisible by 256 "
        "(required for type    q4_K) (WARNING: must use F16 due to unusual shape) "
        "-> falling back to     f16\n"
        "[   1/  12] output.weight - [   384,    512,      1,      1], type =    f16, converting to q8_0\n"
    )
    assert convert_gguf.parse_fallbacks(log) == [
        {"tensor": "blk.0.attn_v.weight", "wanted": "q6_K", "used": "q8_0", "ncols": 384, "block": 256},
        {"tensor": "blk.3.ffn_down.weight", "wanted": "q4_K", "used": "f16", "ncols": 40, "block": 256},
    ]
    summary = convert_gguf.fallback_summary(convert_gguf.parse_fallbacks(log))
    assert summary == (
        "2 tensors fell back from q6_K/q4_K (row size 384/40 not divisible by 256): "
        "1 q6_K → q8_0 (blk.0.attn_v.weight); 1 q4_K → f16 (blk.3.ffn_down.weight)"
    )


def test_importing_the_builders_imports_no_heavy_package():
    code = (
        "import sys, adapterctl.convert.gguf; "
        "print([m for m in ('torch', 'transformers', 'peft', 'llama_cpp') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- adapterctl.formats.gguf on real GGUFs (its unit tests are in test_formats.py) ------------------


def test_tensor_sizes_are_where_gguf_py_reads_the_data(base_ggufs, merged_q4, read):
    for path in (base_ggufs["f16"], base_ggufs["Q4_K_M"], merged_q4.out / "model.gguf"):
        expected = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in read(str(path)).tensors}
        assert gguf_format.tensor_sizes(path) == expected


def test_changed_tensor_bytes_of_a_merged_gguf_is_the_lora_tensors(merged_q4, base_ggufs, read):
    model = merged_q4.out / "model.gguf"
    lora_bytes = sum(int(t.n_bytes) for t in read(str(model)).tensors if t.name in LORA_TENSORS)
    assert gguf_format.changed_tensor_bytes(base_ggufs["Q4_K_M"], model) == lora_bytes > 0
