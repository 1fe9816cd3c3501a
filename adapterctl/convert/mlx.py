"""Builders for `kind: mlx` endpoints (DESIGN §5): an mlx_lm adapter, or a fused model directory.

    adapter  mlxformat.peft_to_mlx: adapters.safetensors + adapter_config.json, loaded with
             mlx_lm.load(base, adapter_path=release)
    fused    base + LoRA merged: config.json, the tokenizer files and the base's safetensors
             shard(s) with W' = W + scale · (B @ A) on every LoRA'd linear layer, loaded with
             mlx_lm.load(release) and no adapter (what `mlx_lm.fuse` makes, without its de-quantize
             and upload options)

Both need only numpy and json: safetensors files are read through mmap and written byte for byte,
so every tensor the LoRA does not touch keeps its dtype and bits (BF16 included, which numpy cannot
represent), and the training box needs neither mlx nor torch to build them.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl import mlxformat
from adapterctl.convert import CONVERTER_VERSION, ConversionError, Job

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# files of a Hugging Face model directory that are weights (never copied as they are); everything
# else at the top level (config, tokenizer, generation config, chat template, license) is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
_FLOATS = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
# PEFT config keys a plain W + scale·B·A merge cannot express (the value is what the message says)
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
    "lora_bias": "LoRA biases (lora_bias: true)",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


def _converter(name: str) -> dict[str, str]:
    return {"name": name, "version": CONVERTER_VERSION}


def num_hidden_layers(base_dir: Path) -> int | None:
    """The base model's decoder layer count from config.json (text_config for multimodal configs)."""
    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    for section in (cfg, cfg.get("text_config") or {}):
        n = section.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


# -- adapter ------------------------------------------------------------------------------------


def build_adapter(job: Job, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """PEFT → mlx_lm adapter in `out` (adapters.safetensors, adapter_config.json).

    With job.base_dir, its num_hidden_layers lets an adapter that stops below the last layer be
    padded exactly. Raises ConversionError for an adapter mlx_lm's LoRA cannot express.
    """
    started = time.monotonic()
    layers = None
    if job.base_dir is not None:
        try:
            layers = num_hidden_layers(job.base_dir)
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"model {job.model} {job.version}: cannot read {job.base_dir / 'config.json'}: {exc}",
                f"set models.{job.model}.base_dir to the base model (Hugging Face layout)",
            ) from None
    try:
        summary = mlxformat.peft_to_mlx(job.source_dir, out, layers)
    except ValueError as exc:
        raise ConversionError(
            f"model {job.model} {job.version}: no MLX adapter: {exc}",
            "use format: fused (merges the LoRA into the base, needs base_dir) or format: peft",
        ) from None
    layers_peft, padded = summary["layers"], len(summary["padded_layers"])
    progress(
        f"mlx adapter: {summary['tensors']} tensors, layers {layers_peft[0]}..{layers_peft[-1]}"
        f"{f' + {padded} zero-padded' if padded else ''}, "
        f"rank {summary['rank']}, scale {summary['scale']:g} ({time.monotonic() - started:.2f} s)"
    )
    keep = ("num_layers", "rank", "scale", "keys", "dtype", "tensors", "assumed_last_layer", "source_sha256")
    mlx = {k: summary[k] for k in keep}
    mlx["peft_layers"] = [layers_peft[0], layers_peft[-1]]
    mlx["padded_layers"] = padded
    return {"converter": _converter("adapterctl.mlxformat.peft_to_mlx"), "mlx": mlx}


# -- fused --------------------------------------------------------------------------------------


class _Safetensors:
    """A safetensors file opened through mmap: header entries and zero-copy tensor bytes."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            size = path.stat().st_size
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", self.map[:8])
        if n > min(100 << 20, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(bytes(self.map[8 : 8 + n]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: safetensors header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict[str, Any]] = header
        self.start = 8 + n
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                ok = 0 <= begin <= end <= size - self.start
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{path}: tensor {name}: malformed header entry {entry!r}")

    def raw(self, name: str) -> memoryview:
        begin, end = self.header[name]["data_offsets"]
        return memoryview(self.map)[self.start + begin : self.start + end]

    def float32(self, name: str):
        """The tensor as a float32 numpy array (F32, F16, BF16)."""
        import numpy as np

        entry = self.header[name]
        dtype = entry["dtype"]
        if dtype not in _FLOATS:
            raise ValueError(f"{self.path}: tensor {name} is {dtype}, not F32/F16/BF16")
        array = np.frombuffer(self.raw(name), dtype=_FLOATS[dtype])
        if math.prod(entry["shape"]) != array.size:
            raise ValueError(f"{self.path}: tensor {name}: shape {entry['shape']} does not fit its data")
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32, copy=False).reshape(entry["shape"])


def _to_dtype(array, dtype: str) -> bytes:
    """float32 array → raw little-endian bytes of `dtype`; BF16 rounds to nearest even, as torch does."""
    import numpy as np

    if dtype == "F32":
        return np.ascontiguousarray(array, "<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(array.astype("<f2")).tobytes()
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(array)] = 0x7FC0  # rounding could carry a NaN's payload into the exponent
    return rounded.astype("<u2").tobytes()


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first
    pattern that matches the end of the module's name, else the default."""
    for pat, value in pattern.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _fail(job: Job, what: str, fix: str = "deploy it as format: peft, or merge it with PEFT yourself"):
    return ConversionError(f"model {job.model} {job.version}: no fused MLX model: {what}", fix)


def _lora_updates(job: Job) -> tuple[dict[str, dict[str, Any]], _Safetensors, dict[str, Any]]:
    """{module: {A, B, r, alpha, scale}} from the PEFT adapter, refusing what a merge cannot express."""
    try:
        cfg = json.loads((job.source_dir / PEFT_CONFIG).read_text(encoding="utf-8"))
        lora = _Safetensors(job.source_dir / PEFT_WEIGHTS)
    except (OSError, ValueError) as exc:
        raise _fail(job, f"cannot read the PEFT adapter: {exc}", "re-register the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(job, f"peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise _fail(job, f"{what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise _fail(job, f"bias {cfg['bias']!r} is not supported (only 'none')")
    r0, alpha0 = cfg.get("r"), cfg.get("lora_alpha")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise _fail(job, "rank_pattern/alpha_pattern must be mappings")
    pairs: dict[str, dict[str, str]] = {}
    for name in sorted(lora.header):
        m = _LORA_KEY.match(name)
        if m is None:
            raise _fail(job, f"tensor {name} is not a linear layer's lora_A/lora_B (embedding LoRA? DoRA?)")
        pairs.setdefault(m["module"], {})[m["ab"]] = name
    if not pairs:
        raise _fail(job, f"{PEFT_WEIGHTS} holds no lora_A/lora_B tensors")
    updates = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise _fail(job, f"{module} has no {'lora_B' if 'A' in ab else 'lora_A'}")
        a_shape, b_shape = lora.header[ab["A"]]["shape"], lora.header[ab["B"]]["shape"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise _fail(job, f"{module}: lora_A {a_shape} and lora_B {b_shape} are not (r, in) and (out, r)")
        r = _pattern_value(rank_pattern, module, r0)
        alpha = _pattern_value(alpha_pattern, module, alpha0)
        if isinstance(r, bool) or not isinstance(r, int) or r != a_shape[0]:
            raise _fail(job, f"{module}: rank {a_shape[0]} in the tensors, r={r!r} in the config")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise _fail(job, f"{module}: lora_alpha must be a number, not {alpha!r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        updates[module] = {"A": ab["A"], "B": ab["B"], "r": r, "alpha": alpha, "scale": float(scale)}
    return updates, lora, cfg


def _base_shards(job: Job, base_dir: Path) -> tuple[list[Path], Path | None]:
    index = base_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({base_dir / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _fail(job, f"cannot read {index}: {exc}", "check base_dir") from None
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise _fail(job, f"{index.name} names shards that are missing: {missing}", "check base_dir")
        return shards, index
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise _fail(job, f"base model {base_dir} holds no *.safetensors", "check base_dir")
    return shards, None


def build_fused(job: Job, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Base + LoRA merged into a model directory `out` that mlx_lm.load(out) loads without an adapter.

    Copies the base's non-weight files (config.json, tokenizer files, ...), its shard layout and
    index, and writes every shard with W' = W + scale · (B @ A) (float32 math, cast back to W's
    dtype) on each LoRA'd weight; other tensors are copied bit for bit. rank_pattern/alpha_pattern
    are applied as PEFT does. Raises ConversionError for a LoRA a plain merge cannot express
    (DoRA, biases, embeddings, modules_to_save, ...) or a base it does not fit.
    """
    started = time.monotonic()
    if job.base_dir is None:
        raise _fail(job, "it needs the base model", f"set models.{job.model}.base_dir")
    base_dir = job.base_dir
    try:
        base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(job, f"cannot read {base_dir / 'config.json'}: {exc}", "check base_dir") from None
    if base_config.get("quantization_config"):
        method = (base_config["quantization_config"] or {}).get("quant_method", "?")
        raise _fail(
            job, f"base model {base_dir} is quantized ({method})", "point base_dir at the unquantized model"
        )
    updates, lora, cfg = _lora_updates(job)
    shards, index = _base_shards(job, base_dir)

    pending = dict(updates)  # module -> update, until its weight is found in a shard
    dtypes: dict[str, int] = {}
    merged_bytes = 0
    for shard in shards:
        try:
            src = _Safetensors(shard)
        except (OSError, ValueError) as exc:
            raise _fail(job, f"cannot read base weights {shard}: {exc}", "check base_dir") from None
        tensors: dict[str, tuple[str, tuple[int, ...], Any]] = {}
        for name, entry in src.header.items():
            tensors[name] = (entry["dtype"], tuple(entry["shape"]), src.raw(name))
            module = name.removesuffix(".weight")
            update = pending.pop(module, None) if name.endswith(".weight") else None
            if update is None:
                continue
            dtype, shape = entry["dtype"], entry["shape"]
            a_shape, b_shape = lora.header[update["A"]]["shape"], lora.header[update["B"]]["shape"]
            if dtype not in _FLOATS:
                raise _fail(job, f"base weight {name} is {dtype}, not F32/F16/BF16", "check base_dir")
            if len(shape) != 2 or [b_shape[0], a_shape[1]] != list(shape):
                raise _fail(
                    job,
                    f"{module} is {shape} in the base, the LoRA expects {[b_shape[0], a_shape[1]]}",
                    "set base_dir to the model the adapter was trained on",
                )
            try:
                delta = update["scale"] * (lora.float32(update["B"]) @ lora.float32(update["A"]))
                blob = _to_dtype(src.float32(name) + delta, dtype)
            except ValueError as exc:
                raise _fail(job, str(exc)) from None
            tensors[name] = (dtype, tuple(shape), blob)
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            merged_bytes += len(blob)
            del delta
        mlxformat.write_safetensors(out / shard.name, tensors, src.metadata)
        del tensors
    if pending:
        missing = sorted(pending)
        raise _fail(
            job,
            f"the LoRA changes {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
            f"which base model {base_dir} does not have (a different model?)",
            "set base_dir to the model the adapter was trained on",
        )
    copied = []
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES) or (f.name.endswith(_WEIGHT_INDEXES) and f != index):
            continue
        shutil.copy2(f, out / f.name)  # config.json, tokenizer*, generation_config.json, the index, ...
        copied.append(f.name)
    if "config.json" not in copied:
        raise _fail(job, f"base model {base_dir} has no config.json", "check base_dir")
    scales = sorted({u["scale"] for u in updates.values()})
    ranks = sorted({u["r"] for u in updates.values()})
    seconds = time.monotonic() - started
    progress(
        f"mlx fused: merged {len(updates)} LoRA modules (rank {'/'.join(map(str, ranks))}) into "
        f"{len(shards)} shard{'s' if len(shards) > 1 else ''} ({seconds:.2f} s)"
    )
    return {
        "converter": _converter("adapterctl.convert.mlx.build_fused"),
        "mlx": {
            "fused_modules": len(updates),
            "ranks": ranks,
            "scales": scales,
            "use_rslora": bool(cfg.get("use_rslora")),
            "patterns": bool(cfg.get("rank_pattern") or cfg.get("alpha_pattern")),
            "base_dtypes": dtypes,
            "shards": [s.name for s in shards],
            "copied": [n for n in copied if not n.endswith(".safetensors")],
        },
    }
