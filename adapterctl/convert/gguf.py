"""The gguf builders (DESIGN §5): `merged` (base + LoRA → model.gguf) and `lora` (→ adapter.gguf).

    merged  PEFT merge_and_unload in the base's dtype → save_pretrained (+ the base's tokenizer
            files) → llama.cpp's convert_hf_to_gguf.py (f16; f32/bf16 for those types) →
            llama_model_quantize (default Q4_K_M), in a subprocess so a native crash cannot take
            the CLI down. Tensors whose row size does not fit the k-quant block (256) fall back
            to another type; llama.cpp prints one line per tensor, which ends up in meta.
    lora    llama.cpp's convert_lora_to_gguf.py → adapter.gguf, plus the base model as an f16
            GGUF for the fidelity check, cached per base digest beside the conversion cache.

The converters are the Python scripts of the llama.cpp that the pinned llama-cpp-python vendors,
extracted by scripts/build-llama-cpp-wheel into `tools_dir()`; they run as subprocesses with that
directory's gguf-py. torch/transformers/peft/llama_cpp are imported inside functions only.

    python -m adapterctl.convert.gguf quantize SRC DST TYPE   # what build_merged runs
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl.convert.job import Job
from adapterctl.convert.spec import DEFAULT_QUANT, UNQUANTIZED, ConversionError, check_quant
from adapterctl.convert.tools import CONVERT_HF, CONVERT_LORA, converter_info, llama_cpp_version, tools_dir
from adapterctl.endpoint_ops import sha256_file

Progress = Callable[[str], None]

BASE_GGUF = "base.gguf"
STDERR_TAIL_LINES = 15

# weights and model files that the merged directory gets from save_pretrained, not from the base
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_OUTTYPE = {"F32": "f32", "BF16": "bf16"}  # every other type converts to f16 first
_TORCH_DTYPES = ("float32", "float16", "bfloat16")

# llama.cpp (src/llama-quant.cpp, tensor_type_fallback) logs, per tensor, in one line:
# "warning: blk.0.attn_q.weight                  - ncols    384 not divisible by 256 (required for
#  type    q4_K) -> falling back to    q5_0"  (with "(WARNING: must use F16 due to unusual shape) "
# before the arrow when the fallback type does not fit either)
_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+)\s+"
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<used>\S+)"
)
_FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


def _tool_env(tools: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tools / "gguf-py"), "NO_LOCAL_GGUF": "1"}


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line.rstrip() for line in text.splitlines() if line.strip(" ^~\t")][-lines:]  # no ^^^ markers
    return "\n".join("  " + line for line in kept) or "  (no output)"


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**10:.0f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def run_converter(tools: Path, script: str, args: list[str], dest: Path, context: str) -> None:
    """Run one of llama.cpp's converter scripts writing `dest`; ConversionError with the last
    lines of its stderr when it fails or writes nothing."""
    proc = subprocess.run(
        [sys.executable, str(tools / script), *args, "--outfile", str(dest)],
        env=_tool_env(tools),
        capture_output=True,
        text=True,
        errors="replace",
    )
    if proc.returncode != 0 or not dest.is_file():
        what = _exit_text(proc.returncode) if proc.returncode else f"exit 0 but no {dest.name} written"
        raise ConversionError(
            f"{context}: llama.cpp's {script} failed ({what}); its stderr ends:\n{_tail(proc.stderr)}",
            f"the converter ran as: {Path(sys.executable).name} {tools / script} {' '.join(args)}",
        )


def convert_hf(
    tools: Path, hf_dir: Path, dest: Path, outtype: str, context: str, name: str | None = None
) -> None:
    """HF model directory → GGUF (`outtype` f16|bf16|f32) with convert_hf_to_gguf.py."""
    args = [str(hf_dir), "--outtype", outtype] + (["--model-name", name] if name else [])
    run_converter(tools, CONVERT_HF, args, dest, context)


# -- quantizing -------------------------------------------------------------------------------


def ftype_name(quant: str) -> str:
    """llama-cpp-python's constant for a QUANT_TYPES name (LLAMA_FTYPE_MOSTLY_Q4_K_M, ...)."""
    return "LLAMA_FTYPE_ALL_F32" if quant == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant}"


def parse_fallbacks(log: str) -> list[dict[str, Any]]:
    """The tensors llama.cpp quantized to another type than the one wanted (from its stderr)."""
    return [
        {
            "tensor": m["tensor"],
            "wanted": m["wanted"],
            "used": m["used"],
            "ncols": int(m["ncols"]),
            "block": int(m["block"]),
        }
        for m in _FALLBACK.finditer(log)
    ]


def fallback_summary(fallbacks: list[dict[str, Any]], shown: int = 3) -> str:
    """One line: '7 tensors fell back from q4_K/q6_K (row size 384 not divisible by 256): 6 q4_K →
    q5_0 (token_embd.weight, blk.0.attn_k.weight, blk.0.attn_output.weight and 3 more); 1 ...'."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in fallbacks:
        groups.setdefault((f["wanted"], f["used"]), []).append(f["tensor"])
    parts = []
    for (wanted, used), names in groups.items():
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        parts.append(f"{len(names)} {wanted} → {used} ({listed})")
    wanted = "/".join(dict.fromkeys(f["wanted"] for f in fallbacks))
    rows = "/".join(dict.fromkeys(str(f["ncols"]) for f in fallbacks))
    blocks = "/".join(dict.fromkeys(str(f["block"]) for f in fallbacks))
    n = len(fallbacks)
    return (
        f"{n} tensor{'s' if n != 1 else ''} fell back from {wanted} "
        f"(row size {rows} not divisible by {blocks}): " + "; ".join(parts)
    )


def quantize(src: Path, dest: Path, quant: str, context: str) -> tuple[list[dict[str, Any]], str]:
    """Quantize GGUF `src` to `dest` as `quant` in a subprocess (llama_model_quantize).

    Returns (fallbacks, llama.cpp's log). Raises ConversionError with the log's last lines when
    the subprocess fails or crashes."""
    package_root = str(Path(__file__).resolve().parents[2])  # so `-m adapterctl...` works uninstalled
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl.convert.gguf", "quantize", str(src), str(dest), quant],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        errors="replace",
    )
    if proc.returncode != 0 or not dest.is_file():
        hint = None
        if proc.returncode < 0:
            hint = (
                "a native llama-cpp-python build crashes on some CPUs (AMX): reinstall it with "
                "scripts/build-llama-cpp-wheel (GGML_NATIVE=OFF)"
            )
        raise ConversionError(
            f"{context}: quantizing {src.name} to {quant} failed ({_exit_text(proc.returncode)}); "
            f"last lines of llama.cpp's log:\n{_tail(proc.stderr)}",
            hint,
        )
    return parse_fallbacks(proc.stderr), proc.stderr


def _quantize_main(argv: list[str]) -> int:
    """`quantize SRC DST TYPE`: llama.cpp's log goes to stderr in full (build_merged parses it)."""
    if len(argv) != 3:
        print("usage: python -m adapterctl.convert.gguf quantize SRC DST TYPE", file=sys.stderr)
        return 2
    src, dest, quant = argv
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG)  # its log callback prints every level
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name(quant))
    rc = llama_cpp.llama_model_quantize(src.encode(), dest.encode(), params)
    if rc != 0:
        print(f"\nllama_model_quantize({src}, {dest}, {quant}) returned {rc}", file=sys.stderr)
        return 1
    return 0


# -- merging ----------------------------------------------------------------------------------


def base_dtype(config: dict[str, Any]) -> str:
    """The torch dtype the base is stored in (config dtype / torch_dtype), float32 when unknown."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    return name if name in _TORCH_DTYPES else "float32"


def merge_lora(base_dir: Path, adapter_dir: Path, dest: Path) -> str:
    """PEFT merge_and_unload of the adapter into the base (in the base's dtype), saved to `dest`
    with the base's tokenizer files. Returns the dtype used."""
    import gc
    import json
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    dtype = base_dtype(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr is our progress lines, not transformers' bars
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter from transformers/peft
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype))
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            merged.save_pretrained(str(dest))
            del base, merged
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    gc.collect()
    for f in sorted(base_dir.iterdir()):  # tokenizer*, special_tokens_map.json, vocab/merges, templates
        if (
            f.is_file()
            and not f.name.startswith(".")
            and not f.name.endswith(_WEIGHT_SUFFIXES + (".index.json",))
            and not (dest / f.name).exists()  # config.json, generation_config.json: the merged model's
        ):
            shutil.copy2(f, dest / f.name)
    return dtype


# -- builders ---------------------------------------------------------------------------------


def build_merged(job: Job, out: Path, progress: Progress) -> dict[str, Any]:
    """base + LoRA merged, converted and quantized → `out/model.gguf`.

    Returns meta: converter, fallbacks, merge_dtype, outtype, stage_seconds and _paths
    (unquantized_gguf: the f16/bf16/f32 GGUF the quantized one was made from). Raises
    ConversionError (tools missing, converter or quantizer failed)."""
    quant = check_quant(job.spec.quant or DEFAULT_QUANT)
    tools = tools_dir()
    context = f"model {job.model} {job.version}"
    if job.base_dir is None:
        raise ConversionError(f"{context}: a merged GGUF needs the base model (base_dir is not set)")
    scratch = out.parent
    outtype = _OUTTYPE.get(quant, "f16")
    seconds: dict[str, float] = {}

    started = time.monotonic()
    merged_dir = scratch / "merged-hf"
    dtype = merge_lora(job.base_dir, job.source_dir, merged_dir)
    seconds["merge"] = round(time.monotonic() - started, 2)
    progress(f"merged LoRA into base ({dtype}) in {seconds['merge']:.1f} s")

    started = time.monotonic()
    unquantized = scratch / f"model-{outtype}.gguf"
    convert_hf(tools, merged_dir, unquantized, outtype, context, name=job.model)
    shutil.rmtree(merged_dir, ignore_errors=True)  # a second full copy of the model: free the disk now
    seconds["convert"] = round(time.monotonic() - started, 2)
    progress(f"HF→GGUF {outtype} in {seconds['convert']:.1f} s ({_size(unquantized)})")

    fallbacks: list[dict[str, Any]] = []
    model = out / "model.gguf"
    if quant in UNQUANTIZED:
        os.replace(unquantized, model)
        unquantized = model
    else:
        started = time.monotonic()
        fallbacks, log = quantize(unquantized, model, quant, context)
        seconds["quantize"] = round(time.monotonic() - started, 2)
        progress(f"quantized to {quant} in {seconds['quantize']:.1f} s ({_size(model)})")
        if fallbacks:
            progress(fallback_summary(fallbacks))
        counted = _FALLBACK_COUNT.search(log)
        if counted and int(counted.group(1)) != len(fallbacks):  # llama.cpp changed its message
            progress(f"llama.cpp reports {counted.group(1)} fallback tensors, {len(fallbacks)} were parsed")
    return {
        "converter": converter_info(tools),
        "fallbacks": fallbacks,
        "merge_dtype": dtype,
        "outtype": outtype,
        "stage_seconds": seconds,
        "_paths": {"unquantized_gguf": str(unquantized)},
    }


def _recorded_sha(sha_file: Path) -> str | None:
    try:
        return sha_file.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def base_gguf(job: Job, cache: Path, tools: Path, progress: Progress) -> tuple[Path, str]:
    """The base model as an f16 GGUF, cached at `{cache}/base-gguf-{digest[:16]}-{llama-cpp-python
    version}/base.gguf` with its sha256 beside it; rebuilt when it does not match. Returns
    (path, sha256)."""
    context = f"model {job.model} {job.version}"
    if job.base_dir is None or not job.base_digest:
        raise ConversionError(f"{context}: a GGUF LoRA needs the base model (base_dir is not set)")
    final = cache / f"base-gguf-{job.base_digest[:16]}-{llama_cpp_version()}"
    path, sha_file = final / BASE_GGUF, final / f"{BASE_GGUF}.sha256"
    if final.exists():
        recorded = _recorded_sha(sha_file)
        if recorded and path.is_file() and sha256_file(str(path)) == recorded:
            progress(f"base GGUF: reusing {path} (sha256 verified)")
            return path, recorded
        why = "no recorded sha256" if not recorded else "missing" if not path.is_file() else "sha256 mismatch"
        progress(f"base GGUF {path} is damaged ({why}): rebuilding")
        shutil.rmtree(final, ignore_errors=True)
    started = time.monotonic()
    tmp = cache / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert_hf(tools, job.base_dir, tmp / BASE_GGUF, "f16", context)
        sha = sha256_file(str(tmp / BASE_GGUF))
        (tmp / sha_file.name).write_text(f"{sha}  {BASE_GGUF}\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent build renamed its copy first: same input, use that one
            if _recorded_sha(sha_file) is None:
                raise
            sha = _recorded_sha(sha_file) or sha
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"base HF→GGUF f16 in {time.monotonic() - started:.1f} s ({_size(path)}), cached at {path}")
    return path, sha


def build_lora(job: Job, out: Path, progress: Progress) -> dict[str, Any]:
    """The PEFT adapter as a GGUF LoRA → `out/adapter.gguf`, and the cached base GGUF it applies to.

    Returns meta: converter, base_gguf_sha256, stage_seconds and _paths (base_gguf). Raises
    ConversionError (tools missing, converter failed)."""
    tools = tools_dir()
    context = f"model {job.model} {job.version}"
    if job.base_dir is None:
        raise ConversionError(f"{context}: a GGUF LoRA needs the base model (base_dir is not set)")
    started = time.monotonic()
    adapter = out / "adapter.gguf"
    args = [str(job.source_dir), "--base", str(job.base_dir), "--outtype", "f16"]
    run_converter(tools, CONVERT_LORA, args, adapter, context)
    seconds = {"convert": round(time.monotonic() - started, 2)}
    progress(f"PEFT→GGUF LoRA f16 in {seconds['convert']:.1f} s ({_size(adapter)})")
    started = time.monotonic()
    base, sha = base_gguf(job, out.parent.parent, tools, progress)
    seconds["base_gguf"] = round(time.monotonic() - started, 2)
    return {
        "converter": converter_info(tools),
        "base_gguf_sha256": sha,
        "stage_seconds": seconds,
        "_paths": {"base_gguf": str(base)},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["quantize"]:
        return _quantize_main(args[1:])
    print("usage: python -m adapterctl.convert.gguf quantize SRC DST TYPE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
