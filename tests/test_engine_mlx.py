"""The `mlx` health engine and the PEFT → mlx_lm adapter conversion it reads (DESIGN §5–§6).

Light tests (numpy + safetensors only) check the conversion on synthetic adapters and the engine's
config. Heavy tests run mlx_lm on the real tiny model (`adapterctl.tinymodel`): logits of base +
converted adapter against the numpy/PEFT reference, greedy outputs, and the default suite through
the real MlxEngine + run_suite (good adapter passes, bad adapter fails).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapterctl.errors import ConfigError
from adapterctl.formats.safetensors import SafetensorsFile, write
from adapterctl.health import HealthTarget, resolve_suite, run_suite
from adapterctl.health.engine_mlx import MlxEngine, make
from adapterctl.mlxformat import MLX_CONFIG, MLX_WEIGHTS, peft_to_mlx
from adapterctl.transports.local import LocalTransport

HIDDEN, FFN, R = 16, 24, 4
SHAPES = {  # module -> (in, out)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, 8),
    "mlp.down_proj": (FFN, HIDDEN),
}


def _peft_key(layer: int, module: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.{module}.lora_{ab}.weight"


def _write_peft(path: Path, layers, modules=("self_attn.q_proj", "self_attn.v_proj"), **config) -> dict:
    """A synthetic PEFT LoRA adapter (F32, random, non-zero); returns its tensors."""
    rng = np.random.default_rng(7)
    tensors = {}
    for layer in layers:
        for module in modules:
            fan_in, fan_out = SHAPES.get(module, (HIDDEN, HIDDEN))
            tensors[_peft_key(layer, module, "A")] = rng.standard_normal((R, fan_in), dtype=np.float32)
            tensors[_peft_key(layer, module, "B")] = rng.standard_normal((fan_out, R), dtype=np.float32)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none", **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tensors


# -- conversion (no mlx needed) ----------------------------------------------------------------


def test_conversion_transposes_renames_and_writes_mlx_lm_config(tmp_path):
    peft = _write_peft(tmp_path / "peft", layers=[1, 2], modules=list(SHAPES))
    summary = peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", num_layers_total=3)
    out = load_file(str(tmp_path / "mlx" / MLX_WEIGHTS))
    assert len(out) == 12 and summary["tensors"] == 12
    for layer in (1, 2):
        for module in SHAPES:
            a = out[f"model.layers.{layer}.{module}.lora_a"]
            b = out[f"model.layers.{layer}.{module}.lora_b"]
            np.testing.assert_array_equal(a, peft[_peft_key(layer, module, "A")].T)
            np.testing.assert_array_equal(b, peft[_peft_key(layer, module, "B")].T)
            assert a.shape == (SHAPES[module][0], R) and b.shape == (R, SHAPES[module][1])
    cfg = json.loads((tmp_path / "mlx" / MLX_CONFIG).read_text())
    assert cfg["fine_tune_type"] == "lora"
    assert cfg["num_layers"] == 2  # layers 1..2 are the last two of three
    assert cfg["lora_parameters"] == {"rank": R, "scale": 16 / R, "dropout": 0.05, "keys": sorted(SHAPES)}
    assert summary["layers"] == [1, 2] and summary["padded_layers"] == [] and summary["dtype"] == "F32"


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    _write_peft(tmp_path / "peft", layers=[0], use_rslora=True)
    assert peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 1)["scale"] == 16 / R**0.5


def test_bf16_tensors_are_transposed_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    raw = {}  # BF16 as raw uint16: numpy has no bfloat16
    for module in ("self_attn.q_proj", "self_attn.v_proj"):
        fan_in, fan_out = SHAPES[module]
        for ab, shape in (("A", (R, fan_in)), ("B", (fan_out, R))):
            raw[_peft_key(0, module, ab)] = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    (tmp_path / "peft").mkdir()
    write(
        tmp_path / "peft" / "adapter_model.safetensors",
        {k: ("BF16", v.shape, v.astype("<u2").tobytes()) for k, v in raw.items()},
        {},
    )
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 8}))
    assert peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 1)["dtype"] == "BF16"
    out = SafetensorsFile(tmp_path / "mlx" / MLX_WEIGHTS)
    for module in ("self_attn.q_proj", "self_attn.v_proj"):
        for ab, leaf in (("A", "lora_a"), ("B", "lora_b")):
            name = f"model.layers.0.{module}.{leaf}"
            assert out.tensors[name].dtype == "BF16"
            got = np.frombuffer(out.raw(name), dtype="<u2").reshape(out.tensors[name].shape)
            np.testing.assert_array_equal(got, raw[_peft_key(0, module, ab)].T)


def test_adapter_below_the_last_layer_is_padded_with_exact_zeros(tmp_path):
    _write_peft(tmp_path / "peft", layers=[0, 1])
    summary = peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", num_layers_total=4)
    assert summary["num_layers"] == 4 and summary["padded_layers"] == [2, 3]
    out = load_file(str(tmp_path / "mlx" / MLX_WEIGHTS))
    assert not out["model.layers.3.self_attn.v_proj.lora_b"].any()
    assert out["model.layers.3.self_attn.v_proj.lora_a"].shape == (HIDDEN, R)
    # without the layer count, the adapter is taken to end at the last layer
    assert peft_to_mlx(tmp_path / "peft", tmp_path / "mlx2", None)["num_layers"] == 2


@pytest.mark.parametrize(
    ("layers", "modules", "config", "message"),
    [
        ([0, 2], ["self_attn.q_proj"], {}, "non-contiguous layer set (layers 0..2 without [1])"),
        ([0], ["mlp.fc1"], {}, "target module 'mlp.fc1'"),
        ([0], ["self_attn.q_proj"], {"use_dora": True}, "DoRA"),
        ([0], ["self_attn.q_proj"], {"rank_pattern": {"q_proj": 16}}, "per-module ranks"),
        ([0], ["self_attn.q_proj"], {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ([0], ["self_attn.q_proj"], {"r": 8}, "rank 4/4 in the tensors, r=8"),
        ([0, 1, 2], ["self_attn.q_proj"], {}, "adapts layer 2 but the base model has 2 layers"),
    ],
)
def test_unconvertible_adapters_are_refused(tmp_path, layers, modules, config, message):
    _write_peft(tmp_path / "peft", layers=layers, modules=modules, **config)
    with pytest.raises(ValueError, match="cannot convert this PEFT adapter for mlx_lm") as exc:
        peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 2)
    assert message in str(exc.value)
    assert not (tmp_path / "mlx").exists()


def test_different_modules_on_different_layers_are_refused(tmp_path):
    tensors = _write_peft(tmp_path / "peft", layers=[0, 1])
    del tensors[_peft_key(1, "self_attn.v_proj", "A")], tensors[_peft_key(1, "self_attn.v_proj", "B")]
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="same modules in every adapted layer"):
        peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 2)


def test_embedding_lora_and_missing_pairs_are_refused(tmp_path):
    tensors = _write_peft(tmp_path / "peft", layers=[0])
    del tensors[_peft_key(0, "self_attn.q_proj", "B")]
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="layer 0 self_attn.q_proj has no lora_B"):
        peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 1)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.ones((R, 32), np.float32)
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="embed_tokens.lora_embedding_A"):
        peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", 1)


# -- engine config (no mlx needed) ---------------------------------------------------------------


def test_make_builds_the_engine_and_validates_the_spec():
    engine = make({"engine": "mlx", "base": "/models/base", "command": None, "timeout_s": 60})
    assert isinstance(engine, MlxEngine) and engine.name == "mlx"
    assert engine.describe() == "mlx: /models/base + {release}"
    assert engine.argv_template[:5] == (
        "python3",
        "-m",
        "adapterctl.health.engine_mlx",
        "--base",
        "/models/base",
    )
    assert "--prompt-template" not in engine.argv_template  # the default
    custom = make({"base": "/b", "prompt_template": "Translate: {input}\n", "max_tokens": 8})
    assert custom.argv_template[-2:] == ("--prompt-template", "Translate: {{input}}\n")  # a literal
    assert custom.argv_template[-4:-2] == ("--max-tokens", "8")
    assert engine.timeout_s == 60
    with pytest.raises(ConfigError, match="needs `base:`"):
        make({"engine": "mlx"})
    with pytest.raises(ConfigError, match="max_tokens"):
        make({"base": "/b", "max_tokens": 0})
    with pytest.raises(ConfigError, match="prompt_template"):
        make({"base": "/b", "prompt_template": "no input here"})
    with pytest.raises(ConfigError, match="unknown placeholder"):
        make({"base": "/b", "adapter": "{releases}"})
    with pytest.raises(ConfigError, match="not 'http'"):
        make({"engine": "http", "base": "/b"})


# -- heavy: mlx_lm on the real tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory):
    """The tiny model (its saved tokenizer adds <s>, as it was trained) and both adapters converted
    for mlx_lm."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("sentencepiece")
    from adapterctl import tinymodel

    timings = {}
    started = time.perf_counter()
    tiny = tinymodel.build()
    timings["tinymodel_build_s"] = time.perf_counter() - started
    root = tmp_path_factory.mktemp("mlx")
    base = tiny.base_dir
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    started = time.perf_counter()
    adapters = {}
    for name, src in (("good", tiny.good_adapter), ("bad", tiny.bad_adapter)):
        peft_to_mlx(src, root / name, layers)
        adapters[name] = root / name
    timings["convert_both_s"] = time.perf_counter() - started
    yield {"tiny": tiny, "base": base, "adapters": adapters, "root": root, "timings": timings}
    print(f"\nmlx engine timings: {', '.join(f'{k}={v:.3g}' for k, v in timings.items())}")


def _load(base: Path, adapter: Path | None):
    from mlx_lm import load

    return load(str(base), adapter_path=str(adapter) if adapter else None)


def _max_logit_error(model, reference, pairs) -> float:
    import mlx.core as mx

    worst = 0.0
    for english, target in pairs:
        ids = reference.prompt_ids(english) + reference.sp.encode(target)
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        worst = max(worst, float(np.abs(got - reference.logits(ids)).max()))
    return worst


# f32 throughout; mlx_lm computes W·x + s·B·(A·x) where the reference merges W + s·B·A first, so the
# two differ by float32 rounding only: observed max |Δlogit| ~2e-5 for logits up to ~5.4.
LOGIT_ATOL = 1e-4


@pytest.mark.heavy
@pytest.mark.parametrize("which", ["good", "bad", None])
def test_mlx_logits_and_greedy_outputs_match_the_peft_reference(tiny_mlx, which):
    from adapterctl import tinymodel
    from adapterctl.health.engine_mlx import Generator

    tiny = tiny_mlx["tiny"]
    peft_dir = {"good": tiny.good_adapter, "bad": tiny.bad_adapter, None: None}[which]
    started = time.perf_counter()
    model, tokenizer = _load(tiny_mlx["base"], tiny_mlx["adapters"][which] if which else None)
    tiny_mlx["timings"][f"mlx_load_{which or 'base'}_s"] = time.perf_counter() - started
    reference = tinymodel.Translator(tiny_mlx["base"], peft_dir)
    error = _max_logit_error(model, reference, tinymodel.PAIRS_ES)
    tiny_mlx["timings"][f"max_abs_logit_err_{which or 'base'}"] = error
    assert error < LOGIT_ATOL
    generate = Generator(model, tokenizer)
    for english, _ in tinymodel.PAIRS_ES:
        assert generate.prompt_ids(english) == reference.prompt_ids(english)  # <s> included
        assert generate.tokens(english) == _reference_tokens(reference, english)
        if which:  # the untrained base emits stray byte tokens, and transformers' byte-fallback
            # decoder turns an invalid UTF-8 run into more U+FFFD than sentencepiece does
            assert generate(english) == reference.translate(english)


def _reference_tokens(reference, english: str) -> list[int]:
    """Translator.translate's greedy token ids, with the newline that stopped it (if any)."""
    ids, out = reference.prompt_ids(english), []
    for _ in range(64):
        token = int(reference.logits(ids + out)[-1].argmax())
        if token == reference.sp.eos_id():
            break
        out.append(token)
        if token == reference.newline:
            break
    return out


@pytest.mark.heavy
def test_padded_partial_adapter_is_exact_and_an_unpadded_one_is_refused_by_mlx_lm(tiny_mlx):
    from adapterctl import tinymodel

    tiny, root = tiny_mlx["tiny"], tiny_mlx["root"]
    partial = root / "peft_layer0"  # the good adapter's layer-0 half: LoRA below the last layer
    partial.mkdir()
    shutil.copy(tiny.good_adapter / "adapter_config.json", partial)
    tensors = load_file(str(tiny.good_adapter / "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".layers.0." in k}, str(partial / "adapter_model.safetensors")
    )
    assert peft_to_mlx(partial, root / "mlx_layer0", 2)["padded_layers"] == [1]
    model, _ = _load(tiny_mlx["base"], root / "mlx_layer0")
    reference = tinymodel.Translator(tiny_mlx["base"], partial)
    assert _max_logit_error(model, reference, tinymodel.PAIRS_ES[:2]) < LOGIT_ATOL
    # without the layer count the converter assumes layer 0 is the last: mlx_lm refuses, loudly
    peft_to_mlx(partial, root / "mlx_layer0_unpadded", None)
    with pytest.raises(ValueError, match="not an adapter parameter"):
        _load(tiny_mlx["base"], root / "mlx_layer0_unpadded")


def _suite(tiny_mlx, release: Path, **spec):
    engine = make({"engine": "mlx", "base": str(tiny_mlx["base"]), "python": sys.executable, **spec})
    target = HealthTarget(
        endpoint="t",
        model="tiny",
        version_id="v1",
        release_path=str(release),
        adapter_dir=str(release.parent),
        base_model="local/tiny-llama",
        transport=LocalTransport("t"),
    )
    started = time.perf_counter()
    result = run_suite(resolve_suite("translation_en_es", Path(".")), engine, target)
    return result, time.perf_counter() - started


@pytest.mark.heavy
def test_default_suite_through_the_mlx_engine_good_passes_bad_fails(tiny_mlx):
    from adapterctl import tinymodel

    good, seconds = _suite(tiny_mlx, tiny_mlx["adapters"]["good"])
    tiny_mlx["timings"].update(suite_good_s=seconds, suite_good_p50_ms=good.latency_p50_ms)
    assert good.error is None and good.engine.startswith("mlx: ")
    assert good.all_passed, [(c.input, c.output, c.reason) for c in good.failures]
    assert [c.output for c in good.cases] == [es for _, es in tinymodel.PAIRS_ES]

    bad, seconds = _suite(tiny_mlx, tiny_mlx["adapters"]["bad"])
    tiny_mlx["timings"].update(suite_bad_s=seconds, suite_bad_p50_ms=bad.latency_p50_ms)
    assert bad.error is None
    assert not bad.all_passed and len(bad.failures) >= 4  # only "Amen." (non_empty) can pass
    assert [c.output for c in bad.cases] == [de for _, de in tinymodel.PAIRS_DE]


@pytest.mark.heavy
def test_an_unconverted_peft_release_fails_start_with_mlx_lms_reason(tiny_mlx):
    result, _ = _suite(tiny_mlx, tiny_mlx["tiny"].good_adapter)  # PEFT files, not converted
    assert not result.all_passed
    assert "while loading the model" in result.error
    assert "has no adapters.safetensors (it holds a PEFT adapter: convert it" in result.error, result.error
