"""Phase 2 convert: the MLX builders (adapter, fused) and the fidelity check, on the real tiny model.

The fidelity check decodes the health suite's inputs with the PEFT original (transformers + PEFT,
float32, greedy) and with the artifact's own engine (mlx_lm, llama.cpp), from the same prompt
token ids, and refuses an artifact that answers differently. Here: both MLX formats and the GGUFs
of test_engine_llamacpp (merged f16 / Q4_K_M, GGUF LoRA) pass; a wrong scale, another adapter's
weights, a wrong GGUF fail; bf16 and sharded bases fuse bit-exactly; missing engines say the extra.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapterctl import demo, tinymodel
from adapterctl.convert import ConversionError, ConvertSpec, FidelityFailed, FidelitySpec, Job, fidelity
from adapterctl.convert.mlx import build_adapter, build_fused
from adapterctl.formats.safetensors import SafetensorsFile
from adapterctl.health import resolve_suite

pytestmark = pytest.mark.heavy
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

try:  # the session-cached GGUFs of the tiny model (merged-f16, merged-Q4_K_M, base-f16, *-lora)
    import llama_cpp  # noqa: F401
except ImportError:

    @pytest.fixture(scope="session")
    def ggufs():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[gguf]')")

else:
    from test_engine_llamacpp import ggufs, tiny  # noqa: F401  (fixtures)

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_timings():
    yield
    if TIMINGS:
        print(f"\nconvert/fidelity timings: {', '.join(f'{k}={v:.2f}s' for k, v in TIMINGS.items())}")


@pytest.fixture(scope="module")
def model() -> tinymodel.TinyModel:
    return tinymodel.build()


@pytest.fixture(scope="module")
def fidelity_spec() -> FidelitySpec:
    suite = resolve_suite("translation_en_es", Path("."))
    return FidelitySpec(tuple(c.input for c in suite.cases), suite, tinymodel.PROMPT_TEMPLATE, 64)


def _job(model, spec: FidelitySpec, kind="mlx", fmt="adapter", quant=None, source=None, base=None, **kw):
    return Job(
        model="tiny",
        version="v1",
        spec=ConvertSpec(kind, fmt, quant, **kw),
        source_dir=source or model.good_adapter,
        source_files={},
        base_dir=base or model.base_dir,
        fidelity=spec,
    )


def _build(builder, job: Job, tmp_path: Path, name: str = "out") -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    started = time.perf_counter()
    meta = builder(job, out, lambda line: None)
    TIMINGS[f"{builder.__name__}_{name}"] = time.perf_counter() - started
    return out, meta


def _check(job: Job, out: Path, meta: dict, tmp_path: Path, label: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    started = time.perf_counter()
    try:
        return fidelity.check(job, out, meta, tmp_path, lines.append), lines
    finally:
        TIMINGS[f"check_{label}"] = time.perf_counter() - started
        print("\n" + "\n".join(lines))


def _all_identical(report: dict, n: int = 5) -> None:
    assert report["checked"] is True and report["cases"] == n
    assert report["reference"].startswith("peft ") and " / transformers " in report["reference"]
    assert report["reference_suite_passed"] == n  # the good adapter passes the suite under PEFT
    for result in report["results"]:
        assert result["identical"] == n and result["token_agreement"] == 1.0, result
        assert result["suite_passed"] and result["failures"] == []


# -- MLX adapter -------------------------------------------------------------------------------------


def test_mlx_adapter_is_token_identical_to_peft(model, fidelity_spec, tmp_path):
    pytest.importorskip("mlx_lm")
    job = _job(model, fidelity_spec)
    out, meta = _build(build_adapter, job, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert meta["mlx"]["num_layers"] == 2 and meta["mlx"]["scale"] == 2.0 and "out_dir" not in meta["mlx"]
    report, lines = _check(job, out, meta, tmp_path, "adapter")
    _all_identical(report)
    assert report["bos_prepended"] is False  # the tiny model's saved tokenizer adds <s> itself
    assert [r["artifact"] for r in report["results"]] == ["mlx adapter"]
    assert report["results"][0]["engine"].startswith("mlx_lm ")
    assert any(line.startswith("fidelity: mlx adapter 5/5 cases token-identical to PEFT") for line in lines)


def test_prompt_ids_put_bos_in_front_only_when_the_tokenizer_does_not(model):
    """A Llama tokenizer.json saved without its <s> post-processor (transformers 5's default) still
    gets the <s> the model was trained with; one that adds it is left alone (no double <s>)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    config = json.loads((model.base_dir / "config.json").read_text())
    adds = AutoTokenizer.from_pretrained(str(model.base_dir))
    bare = LlamaTokenizer.from_pretrained(str(model.base_dir), add_bos_token=False)
    with_bos, prepended = fidelity.prompt_ids(adds, config, tinymodel.PROMPT_TEMPLATE, "Amen.")
    assert prepended is False and with_bos[0] == adds.bos_token_id and with_bos[1] != adds.bos_token_id
    assert bare.encode("Amen.\n")[0] != bare.bos_token_id
    assert fidelity.prompt_ids(bare, config, tinymodel.PROMPT_TEMPLATE, "Amen.") == (with_bos, True)


@pytest.mark.parametrize("breakage", ["scale x3", "bad adapter weights"])
def test_a_broken_mlx_adapter_fails_the_check(model, fidelity_spec, tmp_path, breakage):
    pytest.importorskip("mlx_lm")
    job = _job(model, fidelity_spec)
    if breakage == "scale x3":
        out, meta = _build(build_adapter, job, tmp_path)
        config = json.loads((out / "adapter_config.json").read_text())
        config["lora_parameters"]["scale"] *= 3
        (out / "adapter_config.json").write_text(json.dumps(config))
    else:  # the German adapter's weights shipped under the Spanish adapter's name
        out, meta = _build(build_adapter, _job(model, fidelity_spec, source=model.bad_adapter), tmp_path)
    with pytest.raises(FidelityFailed) as info:
        _check(job, out, meta, tmp_path, f"broken_{breakage.replace(' ', '_')}")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "model tiny v1: MLX adapter does not behave like the PEFT original: mlx adapter "
    )
    assert "PEFT said 'Buenos días, bienvenidos al servicio.'" in message or "differs on" in message
    assert message.endswith(fidelity.HINT)
    assert info.value.exit_code == 4
    result = info.value.report["results"][0]
    assert result["identical"] < 5 and result["failures"]
    assert {"input", "expected", "got", "first_difference_at"} <= set(result["failures"][0])
    print(f"\n{breakage}: {message}")


def test_an_mlx_adapter_missing_a_tensor_loads_silently_and_fails_the_check(model, fidelity_spec, tmp_path):
    """mlx_lm loads adapter weights non-strictly: a missing lora_b stays at its zero init."""
    pytest.importorskip("mlx_lm")
    job = _job(model, fidelity_spec)
    out, meta = _build(build_adapter, job, tmp_path)
    tensors = load_file(str(out / "adapters.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.lora_b"]
    save_file(tensors, str(out / "adapters.safetensors"))
    with pytest.raises(FidelityFailed, match=r"mlx adapter differs on [1-5]/5 cases"):
        _check(job, out, meta, tmp_path, "missing_tensor")


def test_an_mlx_adapter_that_does_not_load_fails_the_check(model, fidelity_spec, tmp_path):
    pytest.importorskip("mlx_lm")
    job = _job(model, fidelity_spec)
    out, meta = _build(build_adapter, job, tmp_path)
    tensors = load_file(str(out / "adapters.safetensors"))
    tensors["model.layers.7.self_attn.v_proj.lora_b"] = tensors.pop("model.layers.1.self_attn.v_proj.lora_b")
    save_file(tensors, str(out / "adapters.safetensors"))
    with pytest.raises(
        FidelityFailed, match=r"mlx adapter does not load with mlx_lm [\d.]+: ValueError: "
    ) as info:
        _check(job, out, meta, tmp_path, "unloadable")
    assert "\n" not in str(info.value)
    (result,) = info.value.report["results"]
    assert result["loaded"] is False and "model.layers.7" in result["error"]


def test_build_adapter_refuses_what_mlx_lm_cannot_express_in_one_line(model, fidelity_spec, tmp_path):
    source = tmp_path / "peft"
    shutil.copytree(model.good_adapter, source)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps(config | {"alpha_pattern": {"v_proj": 4}}))
    with pytest.raises(ConversionError) as info:
        _build(build_adapter, _job(model, fidelity_spec, source=source), tmp_path)
    assert "\n" not in str(info.value)
    assert info.value.message.startswith("model tiny v1: no MLX adapter: ")
    assert "per-module alphas" in info.value.message and "format: fused" in info.value.hint


# -- fused MLX model ---------------------------------------------------------------------------------


def test_fused_model_loads_without_an_adapter_and_is_token_identical(model, fidelity_spec, tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx_lm

    job = _job(model, fidelity_spec, fmt="fused")
    out, meta = _build(build_fused, job, tmp_path)
    assert "model.safetensors" in {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.model", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("adapter*"))
    assert meta["mlx"]["fused_modules"] == 4 and meta["mlx"]["base_dtypes"] == {"F32": 4}
    base, fused = (
        load_file(str(model.base_dir / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    changed = sorted(k for k in base if not np.array_equal(base[k], fused[k]))
    assert changed == [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in ("q", "v")]

    fused_model, tokenizer = mlx_lm.load(str(out))  # no adapter_path
    assert _greedy_mlx(fused_model, tokenizer, "Good morning, welcome to the service.") == (
        "Buenos días, bienvenidos al servicio."
    )
    report, lines = _check(job, out, meta, tmp_path, "fused")
    _all_identical(report)
    assert lines[-1].startswith("fidelity: fused MLX model 5/5 cases token-identical to PEFT")


def _greedy_mlx(mlx_model, tokenizer, text: str) -> str:
    """Plain argmax decoding of <s> + the tiny prompt, to the newline or </s>."""
    import mlx.core as mx

    ids = [tokenizer.bos_token_id, *tokenizer.encode(tinymodel.PROMPT_TEMPLATE.format(input=text))]
    out: list[int] = []
    for _ in range(40):
        token = int(mx.argmax(mlx_model(mx.array([ids + out]))[0, -1]))
        if token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token]):
            break
        out.append(token)
    return tokenizer.decode(out)


def test_fused_applies_alpha_pattern_as_peft_does(model, fidelity_spec, tmp_path):
    pytest.importorskip("mlx_lm")
    source = tmp_path / "peft"
    shutil.copytree(model.good_adapter, source)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps(config | {"alpha_pattern": {"v_proj": 4}}))
    job = _job(model, fidelity_spec, fmt="fused", source=source)
    out, meta = _build(build_fused, job, tmp_path)
    assert meta["mlx"]["scales"] == [0.5, 2.0] and meta["mlx"]["patterns"]
    base, fused = (
        load_file(str(model.base_dir / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    lora = load_file(str(source / "adapter_model.safetensors"))
    for module, scale in (("self_attn.v_proj", 4 / 8), ("self_attn.q_proj", 16 / 8)):
        prefix = f"base_model.model.model.layers.0.{module}"
        want = base[f"model.layers.0.{module}.weight"] + scale * (
            lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
        )
        np.testing.assert_allclose(fused[f"model.layers.0.{module}.weight"], want, rtol=0, atol=1e-6)
    report, _ = _check(job, out, meta, tmp_path, "fused_alpha_pattern")  # PEFT applies the pattern too
    assert all(r["identical"] == 5 for r in report["results"])


def test_fused_refuses_a_rank_pattern_that_contradicts_the_tensors(model, fidelity_spec, tmp_path):
    source = tmp_path / "peft"
    shutil.copytree(model.good_adapter, source)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 4}}))
    with pytest.raises(ConversionError, match=r"self_attn.q_proj: rank 8 in the tensors, r=4 in the config"):
        _build(build_fused, _job(model, fidelity_spec, fmt="fused", source=source), tmp_path)
    (source / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(
        ConversionError, match=r"no fused MLX model: DoRA \(use_dora: true\) is not supported"
    ):
        _build(build_fused, _job(model, fidelity_spec, fmt="fused", source=source), tmp_path, "dora")


@pytest.fixture(scope="module")
def bf16_sharded_base(model, tmp_path_factory) -> Path:
    """The tiny base in bfloat16, split over two shards with a model.safetensors.index.json."""
    root = tmp_path_factory.mktemp("bf16")
    base = root / "base"
    base.mkdir()
    for f in model.base_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, base / f.name)
    weights = load_file(str(model.base_dir / "model.safetensors"))
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in weights.items() if ".layers.1." not in k},
        "model-00002-of-00002.safetensors": {k: v for k, v in weights.items() if ".layers.1." in k},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(root / name))
        demo.write_bfloat16(root / name, base / name)
        weight_map |= dict.fromkeys(tensors, name)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    return base


def _raw(path: Path) -> dict[str, tuple[str, bytes]]:
    f = SafetensorsFile(path)
    return {name: (spec.dtype, bytes(f.raw(name))) for name, spec in f.tensors.items()}


def test_fused_bf16_sharded_base_is_bit_exact_and_token_identical(
    model, fidelity_spec, bf16_sharded_base, tmp_path
):
    import torch

    job = _job(model, fidelity_spec, fmt="fused", base=bf16_sharded_base)
    out, meta = _build(build_fused, job, tmp_path)
    assert meta["mlx"]["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert meta["mlx"]["base_dtypes"] == {"BF16": 4}
    index = "model.safetensors.index.json"
    assert (out / index).read_bytes() == (bf16_sharded_base / index).read_bytes()
    lora = load_file(str(model.good_adapter / "adapter_model.safetensors"))
    for shard in meta["mlx"]["shards"]:
        before, after = _raw(bf16_sharded_base / shard), _raw(out / shard)
        assert before.keys() == after.keys()
        for name, (dtype, blob) in before.items():
            assert after[name][0] == dtype == "BF16"
            module = name.removesuffix(".weight")
            a = lora.get(f"base_model.model.{module}.lora_A.weight")
            if a is None:
                assert after[name][1] == blob, f"{name} changed"  # untouched: the same bits
                continue
            # W + 2·B·A in float32 (numpy, as the builder), rounded to bfloat16 by torch (nearest even)
            w = (
                torch.frombuffer(bytearray(blob), dtype=torch.bfloat16)
                .float()
                .numpy()
                .reshape(-1, a.shape[1])
            )
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            want = torch.from_numpy(w + np.float32(2.0) * (b @ a)).to(torch.bfloat16)
            got = torch.frombuffer(bytearray(after[name][1]), dtype=torch.bfloat16).reshape(want.shape)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
    if importlib.util.find_spec("mlx_lm") is not None:
        report, _ = _check(job, out, meta, tmp_path, "fused_bf16_sharded")
        _all_identical(report)


# -- GGUF: merged and LoRA (llama.cpp) ------------------------------------------------------------


def _gguf_out(tmp_path: Path, name: str, src: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    shutil.copy(src, out / name)
    return out


def test_merged_f16_is_identical_and_q4_k_m_passes_the_suite(model, fidelity_spec, ggufs, tmp_path):
    job = _job(model, fidelity_spec, kind="gguf", fmt="merged", quant="Q4_K_M")
    out = _gguf_out(tmp_path, "model.gguf", ggufs / "merged-Q4_K_M.gguf")
    meta = {"_paths": {"unquantized_gguf": str(ggufs / "merged-f16.gguf")}}
    report, lines = _check(job, out, meta, tmp_path, "merged_Q4_K_M")
    unquantized, quantized = report["results"]
    assert unquantized["artifact"] == "unquantized GGUF" and unquantized["must_be_identical"]
    assert unquantized["identical"] == 5 and unquantized["engine"].startswith("llama_cpp ")
    assert quantized["artifact"] == "model.gguf Q4_K_M" and not quantized["must_be_identical"]
    assert quantized["suite_passed"] and quantized["suite_cases_passed"] == 5
    print(f"Q4_K_M token agreement with PEFT: {quantized['token_agreement']}")
    assert "suite 5/5 passed (PEFT 5/5)" in lines[-1]


def test_merged_f16_shipped_as_is_must_be_identical(model, fidelity_spec, ggufs, tmp_path):
    job = _job(model, fidelity_spec, kind="gguf", fmt="merged", quant="F16")
    report, _ = _check(
        job, _gguf_out(tmp_path, "model.gguf", ggufs / "merged-f16.gguf"), {}, tmp_path, "merged_F16"
    )
    assert [r["artifact"] for r in report["results"]] == ["model.gguf F16"]
    _all_identical(report)


def test_a_wrong_gguf_fails_the_check(model, fidelity_spec, ggufs, tmp_path):
    """The base GGUF shipped as the merged model: unquantized → not identical; quantized → fails the suite."""
    f16 = _job(model, fidelity_spec, kind="gguf", fmt="merged", quant="F16")
    out = _gguf_out(tmp_path, "model.gguf", ggufs / "base-f16.gguf")
    with pytest.raises(FidelityFailed, match=r"model.gguf F16 differs on [45]/5 cases"):
        _check(f16, out, {}, tmp_path, "wrong_F16")
    q4 = _job(model, fidelity_spec, kind="gguf", fmt="merged", quant="Q4_K_M")
    meta = {"_paths": {"unquantized_gguf": str(ggufs / "merged-f16.gguf")}}
    with pytest.raises(FidelityFailed) as info:
        _check(q4, out, meta, tmp_path, "wrong_Q4_K_M")
    assert "model.gguf Q4_K_M fails" in str(info.value) and "suite case(s) the PEFT original passes" in str(
        info.value
    )
    unquantized, quantized = info.value.report["results"]
    assert unquantized["identical"] == 5 and not quantized["suite_passed"]


@pytest.mark.parametrize("adapter", ["good", "bad"])
def test_gguf_lora_on_the_base_gguf(model, fidelity_spec, ggufs, tmp_path, adapter):
    job = _job(model, fidelity_spec, kind="gguf", fmt="lora")
    out = _gguf_out(tmp_path, "adapter.gguf", ggufs / f"{adapter}-lora.gguf")
    meta = {"_paths": {"base_gguf": str(ggufs / "base-f16.gguf")}}
    if adapter == "good":
        report, _ = _check(job, out, meta, tmp_path, "lora")
        assert report["results"][0]["artifact"] == "adapter.gguf on base-f16.gguf"
        _all_identical(report)
    else:  # the German LoRA converted under the Spanish adapter's name
        with pytest.raises(FidelityFailed, match=r"differs on 5/5 cases; first 'Good morning"):
            _check(job, out, meta, tmp_path, "lora_bad")


# -- not checked, and missing engines ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fidelity": False}, "fidelity: false in the config"),
        ({"spec": FidelitySpec()}, "the model has no text health suite"),
        ({"base_dir": None}, "no base_dir"),
    ],
)
def test_an_unchecked_artifact_says_why(model, fidelity_spec, tmp_path, change, reason):
    job = _job(model, change.get("spec", fidelity_spec), fidelity=change.get("fidelity", True))
    if "base_dir" in change:
        job = Job(job.model, job.version, job.spec, job.source_dir, {}, None, fidelity=job.fidelity)
    assert fidelity.check(job, tmp_path, {}, tmp_path, print) == {"checked": False, "reason": reason}


@pytest.mark.parametrize(
    ("module", "kind", "fmt", "extra"),
    [
        ("mlx_lm", "mlx", "adapter", "mlx"),
        ("llama_cpp", "gguf", "lora", "gguf"),
        ("peft", "mlx", "fused", "model"),
    ],
)
def test_a_missing_engine_is_a_conversion_error_naming_the_extra(
    model, fidelity_spec, tmp_path, monkeypatch, module, kind, fmt, extra
):
    if kind == "mlx" and module != "mlx_lm":
        pytest.importorskip("mlx_lm")  # else the check stops at the missing mlx_lm first
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    job = _job(model, fidelity_spec, kind=kind, fmt=fmt)
    started = time.perf_counter()
    with pytest.raises(ConversionError) as info:
        fidelity.check(job, tmp_path, {"_paths": {"base_gguf": "/nonexistent.gguf"}}, tmp_path, print)
    assert f"pip install -e '.[{extra}]'" in info.value.hint and "fidelity: false" in info.value.hint
    assert "\n" not in str(info.value)
    assert time.perf_counter() - started < 30  # refused before any model is loaded


# -- through convert.run() ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["adapter", "fused"])
def test_run_builds_checks_and_caches_the_mlx_artifact(model, fidelity_spec, tmp_path, fmt):
    pytest.importorskip("mlx_lm")
    from adapterctl.convert import Cache, run

    job = _job(model, fidelity_spec, fmt=fmt)
    cache = Cache(tmp_path / "store")
    lines: list[str] = []
    artifact, how = run(job, cache, lines.append)
    assert how == "built"
    assert artifact.meta["fidelity"]["checked"] and artifact.meta["fidelity"]["results"][0]["identical"] == 5
    assert "_paths" not in artifact.meta and artifact.meta["converter"]["version"]
    assert artifact.record()["fidelity"] == artifact.meta["fidelity"]
    assert any(line.startswith("fidelity: ") and "5/5 cases token-identical" in line for line in lines)
    assert list(cache.root.glob(".*.tmp-*")) == []  # the scratch dir is gone
    again, how = run(job, cache, lines.append)
    assert how == "cached" and again.files == artifact.files
