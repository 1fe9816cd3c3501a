"""The real tiny model: a built base + LoRA adapters run through the real health engine and suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

from adapterctl import tinymodel  # noqa: E402
from adapterctl.health import HealthTarget, make_engine, resolve_suite, run_suite  # noqa: E402
from adapterctl.transports.local import LocalTransport  # noqa: E402
from adapterctl.versioning import inspect_adapter  # noqa: E402

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="session")
def tiny() -> tinymodel.TinyModel:
    # The default cache ($ADAPTERCTL_CACHE or ~/.cache/adapterctl): warm reruns take milliseconds.
    model = tinymodel.build()
    print(
        f"\ntinymodel build: {model.build_seconds:.1f} s (cached={model.cached}) at {model.base_dir.parent}"
    )
    return model


def _run(tiny: tinymodel.TinyModel, release: Path, *flags: str):
    command = [sys.executable, "-m", "adapterctl.tinymodel", "translate", "--base", str(tiny.base_dir)]
    engine = make_engine({"engine": "command", "command": [*command, *flags, "{release}"]})
    target = HealthTarget(
        endpoint="t",
        model="tiny",
        version_id="v1",
        release_path=str(release),
        adapter_dir=str(release.parent),
        base_model=tinymodel.BASE_MODEL_NAME,
        transport=LocalTransport("t"),
    )
    return run_suite(resolve_suite("translation_en_es", Path(".")), engine, target)


def test_good_adapter_passes_the_default_suite(tiny):
    result = _run(tiny, tiny.good_adapter)
    assert result.error is None
    assert result.all_passed, [(c.input, c.output, c.reason) for c in result.failures]
    assert [c.output for c in result.cases] == [es for _, es in tinymodel.PAIRS_ES]


def test_bad_adapter_fails_the_default_suite(tiny):
    result = _run(tiny, tiny.bad_adapter)
    assert result.error is None
    assert not result.all_passed
    assert len(result.failures) >= 4  # only "Amen." (non_empty) can pass
    assert [c.output for c in result.cases] == [de for _, de in tinymodel.PAIRS_DE]


def test_base_alone_fails_and_differs_from_the_good_adapter(tiny):
    base = _run(tiny, tiny.good_adapter, "--no-adapter")
    good = _run(tiny, tiny.good_adapter)
    assert base.error is None
    assert not base.all_passed
    assert any(b.output != g.output for b, g in zip(base.cases, good.cases, strict=True))


def test_adapters_pass_adapterctl_validation(tiny):
    for path in (tiny.good_adapter, tiny.bad_adapter):
        info = inspect_adapter(path)
        assert info.peft["r"] == 8
        assert info.dtype == "F32"
        assert info.lora_pairs == 4  # q_proj and v_proj in 2 layers
        assert info.base_model == tinymodel.BASE_MODEL_NAME
    assert inspect_adapter(tiny.good_adapter).sha256 != inspect_adapter(tiny.bad_adapter).sha256


def test_numpy_inference_matches_transformers_and_peft(tiny):
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM, LlamaTokenizer

    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny.base_dir), tiny.good_adapter).eval()
    ours = tinymodel.Translator(tiny.base_dir, tiny.good_adapter)
    for english, spanish in tinymodel.PAIRS_ES:
        ids = ours.prompt_ids(english) + ours.sp.encode(spanish)
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours.logits(ids), expected, atol=1e-3)
    # the transformers tokenizer files saved with the base encode like tokenizer.model, and put <s>
    # in front of a prompt as the model was trained (what mlx_lm and the GGUF converter read)
    from transformers import AutoTokenizer

    for hf_tok in (
        LlamaTokenizer.from_pretrained(str(tiny.base_dir)),
        AutoTokenizer.from_pretrained(str(tiny.base_dir)),
    ):
        for english, spanish in tinymodel.PAIRS_ES:
            prompt = tinymodel.PROMPT_TEMPLATE.format(input=english)
            assert hf_tok.encode(prompt) == ours.prompt_ids(english)
            for text in (prompt, spanish):
                assert hf_tok.encode(text, add_special_tokens=False) == ours.sp.encode(text)


def test_missing_adapter_dir_exits_3(tiny, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapterctl.tinymodel",
            "translate",
            "--base",
            str(tiny.base_dir),
            str(tmp_path / "x"),
        ],
        input="Amen.\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == tinymodel.EXIT_BAD_ADAPTER
    assert "does not exist" in proc.stderr


def test_importing_the_module_does_not_import_torch():
    code = "import sys, adapterctl.tinymodel; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_build_is_cached_and_deterministic(tiny, tmp_path):
    def stamps() -> list[tuple[int, int]]:
        paths = (tiny.base_dir.parent, tiny.base_dir.parent / tinymodel.COMPLETE_MARKER, tiny.base_dir)
        return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]

    before = stamps()
    again = tinymodel.build(tiny.base_dir.parent.parent)
    assert again.cached and again.base_dir == tiny.base_dir
    assert stamps() == before  # reused as it is, not rebuilt (instead of a wall-clock budget)
    fresh = tinymodel.build(tmp_path)
    print(f"\ntinymodel cold build: {fresh.build_seconds:.1f} s")
    assert not fresh.cached and fresh.key == tiny.key
    for name in ("good_adapter", "bad_adapter"):
        ours = (getattr(fresh, name) / tinymodel.WEIGHTS_FILE).read_bytes()
        assert ours == (getattr(tiny, name) / tinymodel.WEIGHTS_FILE).read_bytes(), name
    assert (fresh.base_dir / "model.safetensors").read_bytes() == (
        tiny.base_dir / "model.safetensors"
    ).read_bytes()
    assert not list(tmp_path.glob(".tinymodel-*"))  # the temporary build directory is gone


def test_translator_reads_an_adapter_converted_for_mlx_lm_like_the_peft_one(tiny, tmp_path):
    import json

    import numpy as np

    from adapterctl.mlxformat import peft_to_mlx

    layers = json.loads((tiny.base_dir / "config.json").read_text())["num_hidden_layers"]
    peft_to_mlx(tiny.good_adapter, tmp_path / "mlx", layers)
    peft = tinymodel.Translator(tiny.base_dir, tiny.good_adapter)
    mlx = tinymodel.Translator(tiny.base_dir, tmp_path / "mlx")
    for english, _spanish in tinymodel.PAIRS_ES[:3]:
        ids = peft.prompt_ids(english)
        np.testing.assert_allclose(mlx.logits(ids), peft.logits(ids), atol=1e-4)
        assert mlx.translate(english) == peft.translate(english)
    (tmp_path / "mlx" / "adapters.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(tinymodel.BadAdapter, match="cannot read the adapter"):
        tinymodel.Translator(tiny.base_dir, tmp_path / "mlx")
