"""Builders for `kind: mlx` endpoints (DESIGN §5): an mlx_lm adapter, or a fused model directory.

    adapter  mlxformat.peft_to_mlx: adapters.safetensors + adapter_config.json, loaded with
             mlx_lm.load(base, adapter_path=release)
    fused    base + LoRA merged: config.json, the tokenizer files and the base's safetensors
             shard(s) with W' = W + scale · (B @ A) on every LoRA'd linear layer, loaded with
             mlx_lm.load(release) and no adapter (what `mlx_lm.fuse` makes, without its de-quantize
             and upload options)

Both need only numpy and the safetensors library: safetensors files are read through mmap and
written byte for byte (adapterctl.formats.safetensors), so every tensor the LoRA does not touch keeps
its dtype and bits (BF16 included, which numpy cannot represent), and the training box needs
neither mlx nor torch to build them. The PEFT config is read by adapterctl.formats.peft.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl import mlxformat
from adapterctl.convert.job import Job
from adapterctl.convert.spec import CONVERTER_VERSION, ConversionError
from adapterctl.formats import peft
from adapterctl.formats import safetensors as st

PEFT_WEIGHTS = "adapter_model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# files of a Hugging Face model directory that are weights (never copied as they are); everything
# else at the top level (config, tokenizer, generation config, chat template, license) is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


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


def _fail(job: Job, what: str, fix: str = "deploy it as format: peft, or merge it with PEFT yourself"):
    return ConversionError(f"model {job.model} {job.version}: no fused MLX model: {what}", fix)


def _lora_updates(job: Job) -> tuple[dict[str, dict[str, Any]], st.SafetensorsFile, peft.LoraConfig]:
    """{module: {A, B, r, alpha, scale}} from the PEFT adapter, refusing what a merge cannot express."""
    try:
        cfg = peft.load(job.source_dir)
        lora = st.SafetensorsFile(job.source_dir / PEFT_WEIGHTS)
    except (OSError, ValueError) as exc:
        raise _fail(job, f"cannot read the PEFT adapter: {exc}", "re-register the adapter") from None
    blockers = cfg.unsupported_by("fused")
    if blockers:
        raise _fail(job, f"{blockers[0]} is not supported")
    pairs: dict[str, dict[str, str]] = {}
    for name in sorted(lora.tensors):
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
        a_shape, b_shape = lora.tensors[ab["A"]].shape, lora.tensors[ab["B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            shapes = f"lora_A {list(a_shape)} and lora_B {list(b_shape)}"
            raise _fail(job, f"{module}: {shapes} are not (r, in) and (out, r)")
        r = cfg.rank(module)
        if r != a_shape[0]:
            raise _fail(job, f"{module}: rank {a_shape[0]} in the tensors, r={r!r} in the config")
        scale = cfg.scale(module)
        updates[module] = {"A": ab["A"], "B": ab["B"], "r": r, "alpha": cfg.alpha(module), "scale": scale}
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
            src = st.SafetensorsFile(shard)
        except (OSError, ValueError) as exc:
            raise _fail(job, f"cannot read base weights {shard}: {exc}", "check base_dir") from None
        tensors: dict[str, tuple[str, tuple[int, ...], Any]] = {}
        for name, entry in src.tensors.items():
            tensors[name] = (entry.dtype, entry.shape, src.raw(name))
            module = name.removesuffix(".weight")
            update = pending.pop(module, None) if name.endswith(".weight") else None
            if update is None:
                continue
            dtype, shape = entry.dtype, entry.shape
            a_shape, b_shape = lora.tensors[update["A"]].shape, lora.tensors[update["B"]].shape
            if dtype not in st.FLOAT_DTYPES:
                raise _fail(job, f"base weight {name} is {dtype}, not F32/F16/BF16", "check base_dir")
            if len(shape) != 2 or [b_shape[0], a_shape[1]] != list(shape):
                raise _fail(
                    job,
                    f"{module} is {list(shape)} in the base, the LoRA expects {[b_shape[0], a_shape[1]]}",
                    "set base_dir to the model the adapter was trained on",
                )
            try:
                delta = update["scale"] * (lora.float32(update["B"]) @ lora.float32(update["A"]))
                blob = st.encode(src.float32(name) + delta, dtype)
            except ValueError as exc:
                raise _fail(job, str(exc)) from None
            tensors[name] = (dtype, tuple(shape), blob)
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            merged_bytes += len(blob)
            del delta
        st.write(out / shard.name, tensors, src.metadata)
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
            "use_rslora": cfg.use_rslora,
            "patterns": bool(cfg.rank_pattern or cfg.alpha_pattern),
            "base_dtypes": dtypes,
            "shards": [s.name for s in shards],
            "copied": [n for n in copied if not n.endswith(".safetensors")],
        },
    }
