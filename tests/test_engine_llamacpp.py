"""The `llamacpp` health engine on real GGUFs of the tiny model (merged good adapter, base, quantized).

Needs llama-cpp-python (built by scripts/build-llama-cpp-wheel, which also extracts the GGUF
converter of the same llama.cpp into $ADAPTERCTL_CACHE/llama-cpp-tools-<version>/) and the
`model` extra (torch, transformers, peft) to merge the adapter. The GGUFs are cached next to the
tiny model, keyed by its build key and the llama-cpp-python version: warm reruns skip conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from adapterctl import tinymodel  # noqa: E402
from adapterctl.errors import ConfigError, PhaseError  # noqa: E402
from adapterctl.health import HealthTarget, resolve_suite, run_suite  # noqa: E402
from adapterctl.health.engine_llamacpp import LlamaCppEngine, amx_hazard, make  # noqa: E402
from adapterctl.transports.local import LocalTransport  # noqa: E402

pytestmark = pytest.mark.heavy

QUANT_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_COMPLETE = "COMPLETE"


def _tools_dir() -> Path:
    env = os.environ.get("ADAPTERCTL_LLAMA_CPP_TOOLS")
    if env:
        return Path(env)
    return tinymodel.cache_root() / f"llama-cpp-tools-{llama_cpp.__version__}"


def _convert(
    tools: Path, src: Path, out: Path, script: str = "convert_hf_to_gguf.py", extra: tuple[str, ...] = ()
) -> None:
    proc = subprocess.run(
        [sys.executable, str(tools / script), str(src), "--outtype", "f16", "--outfile", str(out), *extra],
        env={**os.environ, "PYTHONPATH": str(tools / "gguf-py"), "NO_LOCAL_GGUF": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _quantize(src: Path, out: Path, kind: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    assert rc == 0, f"llama_model_quantize {kind} failed with {rc}"


def _build_ggufs(tiny: tinymodel.TinyModel, root: Path) -> dict[str, float]:
    """merged-f16.gguf (base + good adapter), base-f16.gguf, {good,bad}-lora.gguf, merged-<quant>.gguf.

    Returns the timings.
    """
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tools = _tools_dir()
    timings = {}
    started = time.perf_counter()
    merged_dir = root / "merged-hf"
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(str(tiny.base_dir))
        merged = PeftModel.from_pretrained(base, str(tiny.good_adapter)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    for f in tiny.base_dir.iterdir():  # tokenizer.model and the transformers tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, merged_dir / f.name)
    timings["merge_s"] = time.perf_counter() - started
    for name, hf_dir in (("merged", merged_dir), ("base", tiny.base_dir)):
        started = time.perf_counter()
        _convert(tools, hf_dir, root / f"{name}-f16.gguf")
        timings[f"convert_{name}_s"] = time.perf_counter() - started
    for name in ("good", "bad"):  # the PEFT adapters themselves as GGUF LoRAs on base-f16.gguf
        started = time.perf_counter()
        _convert(
            tools,
            getattr(tiny, f"{name}_adapter"),
            root / f"{name}-lora.gguf",
            script="convert_lora_to_gguf.py",
            extra=("--base", str(tiny.base_dir)),
        )
        timings[f"convert_{name}_lora_s"] = time.perf_counter() - started
    for kind in QUANT_TYPES:
        started = time.perf_counter()
        _quantize(root / "merged-f16.gguf", root / f"merged-{kind}.gguf", kind)
        timings[f"quantize_{kind}_s"] = time.perf_counter() - started
    shutil.rmtree(merged_dir)
    return timings


@pytest.fixture(scope="session")
def tiny() -> tinymodel.TinyModel:
    return tinymodel.build()


@pytest.fixture(scope="session")
def ggufs(tiny) -> Path:
    """A directory with the GGUFs, cached by tiny-model key and llama-cpp-python version."""
    if not (_tools_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no GGUF converter at {_tools_dir()}: run scripts/build-llama-cpp-wheel")
    final = tiny.base_dir.parent.parent / f"tinymodel-gguf-{tiny.key[:16]}-{llama_cpp.__version__}"
    if (final / GGUF_COMPLETE).is_file():
        print(f"\ntiny GGUFs: cached at {final}")
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        timings = _build_ggufs(tiny, tmp)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.glob("*.gguf"))}
        (tmp / GGUF_COMPLETE).write_text(f"{timings}\n{sizes}\n", encoding="utf-8")
        print(f"\ntiny GGUFs built: { {k: round(v, 2) for k, v in timings.items()} } sizes {sizes}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / GGUF_COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _release(tmp_path: Path, gguf: Path | None) -> Path:
    release = tmp_path / "releases" / "v1"
    release.mkdir(parents=True)
    if gguf is not None:
        os.symlink(gguf, release / "model.gguf")
    return release


def _target(release: Path) -> HealthTarget:
    return HealthTarget(
        endpoint="t",
        model="tiny",
        version_id="v1",
        release_path=str(release),
        adapter_dir=str(release.parent),
        base_model=tinymodel.BASE_MODEL_NAME,
        transport=LocalTransport("t"),
    )


def _run(release: Path, **spec):
    engine = make({"engine": "llamacpp", "python": sys.executable, **spec})
    started = time.perf_counter()
    result = run_suite(resolve_suite("translation_en_es", Path(".")), engine, _target(release))
    print(f"\n{engine.describe()}: all_passed={result.all_passed} in {time.perf_counter() - started:.2f} s")
    for case in result.cases:
        mark = "ok" if case.passed else "FAIL"
        print(f"  {mark} {case.latency_ms:7.1f} ms  {case.input!r} -> {case.output!r}")
    return result


def test_merged_f16_passes_the_default_suite(ggufs, tmp_path):
    result = _run(_release(tmp_path, ggufs / "merged-f16.gguf"))
    assert result.error is None
    assert result.all_passed, [(c.input, c.output, c.reason) for c in result.failures]
    assert result.engine == "llamacpp: {release}/model.gguf"
    # llama.cpp on the f16 GGUF decodes exactly what the f32 numpy reference does
    assert [c.output for c in result.cases] == [es for _, es in tinymodel.PAIRS_ES]


def test_prompt_template_and_stop_reach_the_program(ggufs, tmp_path):
    release = _release(tmp_path, ggufs / "merged-f16.gguf")
    result = _run(release, prompt_template="{input}\n", stop=["\n", "</s>", " la "], max_tokens=32)
    assert result.error is None
    assert result.cases[2].output == "El apóstol Santiago escribió sobre"  # cut at " la fe"


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K_M"])
def test_quantized_merged_model(ggufs, tmp_path, kind):
    result = _run(_release(tmp_path, ggufs / f"merged-{kind}.gguf"))
    assert result.error is None  # loads and runs (a native AMX build segfaults here)
    assert result.all_passed, [(c.input, c.output, c.reason) for c in result.failures]


def test_base_gguf_fails_the_default_suite(ggufs, tmp_path):
    result = _run(_release(tmp_path, ggufs / "base-f16.gguf"))
    assert result.error is None
    assert not result.all_passed
    assert len(result.failures) >= 4


@pytest.mark.parametrize("adapter", ["good", "bad"])
def test_gguf_lora_on_the_base(ggufs, tmp_path, adapter):
    release = _release(tmp_path, None)
    os.symlink(ggufs / f"{adapter}-lora.gguf", release / "adapter.gguf")
    result = _run(release, lora="{release}/adapter.gguf", base_gguf=str(ggufs / "base-f16.gguf"))
    assert result.error is None
    pairs = tinymodel.PAIRS_ES if adapter == "good" else tinymodel.PAIRS_DE
    assert result.all_passed == (adapter == "good"), [(c.input, c.output) for c in result.cases]
    assert [c.output for c in result.cases] == [target for _, target in pairs]


def test_missing_gguf_is_a_phase_error_naming_it(tmp_path):
    release = _release(tmp_path, None)
    engine = make({"engine": "llamacpp", "python": sys.executable, "timeout_s": 60})
    with pytest.raises(PhaseError) as info, engine:
        engine.start(_target(release))
    assert f"{release}/model.gguf does not exist" in info.value.message
    assert "while loading the model" in info.value.message
    result = _run(release)
    assert not result.all_passed and f"{release}/model.gguf" in result.error


def test_an_unloadable_gguf_is_a_phase_error(tmp_path):
    release = _release(tmp_path, None)
    (release / "model.gguf").write_bytes(b"not a gguf file")
    result = _run(release)
    assert result.error is not None
    assert "cannot load" in result.error and f"{release}/model.gguf" in result.error


def test_spec_builds_the_endpoint_command():
    engine = make({"engine": "llamacpp", "stop": ["\n"], "prompt_template": "Q: {input}\nA:", "n_ctx": 256})
    assert isinstance(engine, LlamaCppEngine)
    assert engine.describe() == "llamacpp: {release}/model.gguf"
    argv = list(engine.argv_template)
    assert argv[:3] == ["python3", "-m", "adapterctl.health.engine_llamacpp"]
    assert argv[argv.index("--gguf") + 1] == "{release}/model.gguf"
    assert argv[argv.index("--n-ctx") + 1] == "256"
    # {input} reaches the program literally (format_map turns {{input}} back into it), as JSON
    assert json.loads(argv[argv.index("--prompt-template-json") + 1].format_map({})) == "Q: {input}\nA:"
    assert json.loads(argv[argv.index("--stop-json") + 1]) == ["\n"]
    assert not any("\n" in a for a in argv)
    default = make({"engine": "llamacpp"}).argv_template  # the defaults are the program's own
    assert "--prompt-template-json" not in default and "--stop-json" not in default
    lora = make({"engine": "llamacpp", "lora": "{release}/adapter.gguf", "base_gguf": "/m/base.gguf"})
    assert lora.describe() == "llamacpp: /m/base.gguf + lora {release}/adapter.gguf"
    assert "--gguf" not in lora.argv_template and "--lora" in lora.argv_template


@pytest.mark.parametrize(
    "spec",
    [
        {"gguf": "{nope}/model.gguf"},
        {"gguf": ""},
        {"lora": "{release}/adapter.gguf"},
        {"lora": "a.gguf", "base_gguf": "b.gguf", "gguf": "c.gguf"},
        {"n_ctx": 0},
        {"max_tokens": "64"},
        {"prompt_template": "no placeholder"},
        {"prompt_template": "{input} {other}"},
        {"stop": "\n"},
        {"timeout_s": -1},
        {"env": {"N": 4}},
        {"engine": "command"},
    ],
)
def test_invalid_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        make({"engine": "llamacpp", **spec})


def test_amx_hazard_detection():
    amx_cpu = "processor : 0\nflags : fpu avx512f amx_bf16 amx_tile amx_int8\n"
    plain_cpu = "processor : 0\nflags : fpu avx2 avx512f\n"
    native = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    native_off = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | REPACK = 1 |"
    assert amx_hazard(amx_cpu, native)
    assert not amx_hazard(amx_cpu, native_off)
    assert not amx_hazard(plain_cpu, native)
    # this machine's installed build must not be hazardous (else the quantized tests would crash)
    info = llama_cpp.llama_print_system_info().decode()
    print(f"\nllama.cpp system info: {info}")
    assert not amx_hazard(Path("/proc/cpuinfo").read_text(errors="replace"), info)
