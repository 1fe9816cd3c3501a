"""`adapterctl demo` end to end, run as a user runs it: the real tiny model, and the stand-in fallback."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from adapterctl.demo import STANDIN_ENV, make_adapter, save_as_bfloat16, upcast_bfloat16


def run_demo(workspace: Path, *, python_prelude: str = "", **env: str) -> subprocess.CompletedProcess:
    """`adapterctl demo WORKSPACE` in a fresh interpreter; `python_prelude` runs before the CLI."""
    environ = {k: v for k, v in os.environ.items() if k != STANDIN_ENV}
    code = f"{python_prelude}\nfrom adapterctl.cli import main\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, "demo", str(workspace)],
        env={**environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def section(out: str, title: str) -> str:
    """The output of the demo step whose title starts with `title`."""
    return out.split(f"==> {title}", 1)[1].split("\n==> ", 1)[0]


def assert_process_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.heavy
def test_demo_with_the_real_tiny_model(tmp_path):
    for module in ("torch", "transformers", "peft", "sentencepiece"):
        pytest.importorskip(module)
    ws = tmp_path / "démo ws"
    proc = run_demo(ws)
    out = proc.stdout
    assert proc.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{proc.stderr}"
    assert "UNEXPECTED" not in out
    assert "tiny model: " in out and "the stand-in" not in out
    assert "adapterctl serve --backend peft" in out

    # cycle 1: converted for mac-demo (kind mlx) and checked against PEFT; passes; the live service
    # (which reads the mlx_lm layout) answers with it
    deploy1 = section(out, "2. deploy cycle 1")
    assert "passed" in deploy1 and "exit 0 — as expected" in deploy1
    assert "[mac-demo] tiny_llama: convert: MLX adapter built" in deploy1
    assert "mlx adapter 5/5 cases token-identical to PEFT" in deploy1
    assert re.search(
        r"'Good morning, welcome to the service\.' → 'Buenos días, bienvenidos al servicio\.' "
        r"\(adapter cycle1_",
        deploy1,
    )
    # cycle 2: the German adapter is stopped before activation, with its actual output shown
    deploy2 = section(out, "4. deploy cycle 2")
    assert "ABORTED, active untouched" in deploy2 and "Guten Morgen" in deploy2
    assert "exit 4 — as expected" in deploy2
    # cycle 3: passes the pre-check, the service cannot load it, adapterctl rolls back by itself
    deploy3 = section(out, "5. deploy cycle 3")
    assert re.search(r"\[mac-demo\] tiny_llama: health-check releases/cycle3_\S+: passed", deploy3)
    assert "bfloat16" in deploy3 and "reload-failed" in deploy3
    assert re.search(r"\[mac-demo\] tiny_llama: ROLLED BACK to cycle1_", deploy3)
    assert "exit 5 — as expected" in deploy3
    assert re.search(r"live service: .* \(adapter cycle1_\S+; mac-demo active: cycle1_", deploy3)
    # the final status table: both endpoints serve cycle 1 again
    status = section(out, "7. status")
    assert re.search(r"mac-demo .* cycle1_\S+ .* adapter .* rolled_back .* cycle1_", status)
    assert re.search(r"rtx-demo .* cycle1_\S+ .* cycle3_\S+ .* healthy", status)

    # the serving process was stopped (by pid), after it confirmed cycle 1 one last time
    pid = int(re.search(r"\(the real tiny model\), pid (\d+)", out).group(1))
    assert_process_gone(pid)
    run_dir = ws / "endpoints" / "mac-demo" / "run"
    assert not (run_dir / "serve.pid").exists()
    loaded = json.loads((run_dir / "loaded.json").read_text())
    assert loaded["ok"] is True and loaded["version_id"].startswith("cycle1_")
    assert "demo finished" in out


@pytest.mark.heavy
def test_demo_without_mlx_converts_but_says_the_fidelity_check_needs_it(tmp_path):
    for module in ("torch", "transformers", "peft", "sentencepiece"):
        pytest.importorskip(module)
    # mlx unimportable, as after the README's `pip install -e '.[model]'`
    proc = run_demo(tmp_path / "ws", python_prelude="import sys; sys.modules['mlx_lm'] = None")
    out = proc.stdout
    assert proc.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{proc.stderr}"
    assert "not fidelity-checked here (that needs mlx: pip install -e '.[mlx]')" in out
    deploy1 = section(out, "2. deploy cycle 1")
    assert "convert: MLX adapter built" in deploy1 and "fidelity not checked (fidelity: false" in deploy1
    assert "exit 0 — as expected" in deploy1


@pytest.mark.heavy
def test_demo_stand_in_when_forced(tmp_path):
    proc = run_demo(tmp_path / "ws", **{STANDIN_ENV: "1"})
    out = proc.stdout
    assert proc.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{proc.stderr}"
    assert out.splitlines()[0].startswith(f"{STANDIN_ENV} is set: this run uses the stand-in")
    assert "tiny model: " not in out and "UNEXPECTED" not in out
    assert "exit 4 — as expected" in section(out, "5. deploy cycle 3")
    assert re.search(r"mac-demo .* cycle1_", section(out, "7. status"))
    pid = int(re.search(r"serving stand-in for mac-demo running as pid (\d+)", out).group(1))
    assert_process_gone(pid)


@pytest.mark.heavy
def test_demo_without_the_model_extra_says_how_to_get_the_real_model(tmp_path):
    # torch unimportable, as after the README's `pip install -e .`
    proc = run_demo(tmp_path / "ws", python_prelude="import sys; sys.modules['torch'] = None")
    out = proc.stdout
    assert proc.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{proc.stderr}"
    first = out.splitlines()[0]
    assert "needs the `model` extra (missing: torch)" in first
    assert "pip install -e '.[model]'" in first
    assert "UNEXPECTED" not in out


@pytest.mark.heavy
def test_demo_refuses_a_directory_that_is_not_empty(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "keep.txt").write_text("mine\n")
    proc = run_demo(tmp_path / "ws", **{STANDIN_ENV: "1"})
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "ws").iterdir()) == ["keep.txt"]


def test_bfloat16_copy_is_a_real_bf16_file_that_the_demo_engine_upcasts(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    src = make_adapter(tmp_path / "f32", seed=7, metrics={"final_loss": 0.5})
    dst = save_as_bfloat16(src, tmp_path / "bf16")
    raw = (dst / "adapter_model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert {meta["dtype"] for meta in header.values()} == {"BF16"}
    assert (dst / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    with pytest.raises((TypeError, KeyError, ValueError)):  # numpy has no bfloat16: the service's loader
        load_file(str(dst / "adapter_model.safetensors"))
    original = load_file(str(src / "adapter_model.safetensors"))
    upcast = upcast_bfloat16(dst / "adapter_model.safetensors")
    assert upcast.keys() == original.keys()
    for name, arr in original.items():
        assert upcast[name].dtype == np.float32 and upcast[name].shape == arr.shape
        np.testing.assert_allclose(upcast[name], arr, rtol=2**-8, atol=1e-30)
    assert upcast_bfloat16(src / "adapter_model.safetensors") is None  # float32: left to the loader
