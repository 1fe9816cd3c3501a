"""PEFT LoRA adapter → the adapter directory `mlx_lm` loads (`mlx_lm.load(base, adapter_path=...)`).

mlx_lm cannot read a PEFT adapter as it is. It wants, in one directory:

- `adapters.safetensors` with `model.layers.{i}.{module}.lora_a` of shape (in, r) and
  `.lora_b` of shape (r, out): the TRANSPOSES of PEFT's `lora_A.weight` (r, in) and
  `lora_B.weight` (out, r), under names without PEFT's `base_model.model.` prefix;
- `adapter_config.json` with `fine_tune_type: "lora"`, `num_layers` and `lora_parameters`
  {rank, scale, dropout, keys}, where scale = lora_alpha / r (lora_alpha / sqrt(r) with
  use_rslora) and keys are the module paths inside one block (`self_attn.q_proj`).

mlx_lm puts LoRA layers on the same `keys` in each of the LAST `num_layers` blocks. A PEFT adapter
on layers lo..hi (contiguous, same modules in each) converts exactly: with `num_layers_total`
known and hi below the last layer, the blocks above hi get explicit all-zero lora_a/lora_b (their
update is exactly 0); without it, num_layers = hi - lo + 1, which assumes hi is the model's last
layer, and mlx_lm refuses to load the adapter (names not matching its LoRA layers) if it is not.
Non-contiguous layer sets, different modules on different layers, DoRA, embeddings, LoRA biases,
per-module rank/alpha patterns and modules outside the decoder blocks are refused (ValueError).

Only numpy and the safetensors library: tensors are read and written byte for byte
(adapterctl.formats.safetensors), so F32, F16 and BF16 tensors keep their dtype and values exactly;
the conversion needs neither torch nor mlx. The PEFT config is read by adapterctl.formats.peft.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from adapterctl.formats import peft
from adapterctl.formats.safetensors import SafetensorsFile, write

PEFT_CONFIG = peft.CONFIG_FILE
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"

# Module paths inside a decoder block that are plain linear layers, named alike in PEFT (transformers)
# and mlx_lm, in Llama-family models (llama, mistral, qwen2/3, gemma).
SUPPORTED_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}  # the float dtypes mlx loads
_RAW = {4: "<u4", 2: "<u2"}  # copy elements as unsigned ints of the same width: bit-exact
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<module>[\w.]+?)"
    r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)


def _refuse(peft_dir: Path, what: str) -> ValueError:
    return ValueError(f"{peft_dir}: cannot convert this PEFT adapter for mlx_lm: {what}")


def _transpose(dtype: str, shape: tuple[int, ...], blob) -> tuple[tuple[int, ...], bytes]:
    import numpy as np

    array = np.frombuffer(blob, dtype=_RAW[_ITEMSIZE[dtype]]).reshape(shape)
    return (shape[1], shape[0]), np.ascontiguousarray(array.T).tobytes()


def _check_config(peft_dir: Path) -> peft.LoraConfig:
    """The PEFT LoRA config; refuses what mlx_lm's LoRA (one rank and scale for all) cannot express."""
    try:
        cfg = peft.load(peft_dir)
    except peft.PeftConfigError as exc:
        raise _refuse(peft_dir, f"{PEFT_CONFIG}: {exc.what}") from None
    blockers = cfg.unsupported_by("adapter")
    if blockers:
        raise _refuse(peft_dir, f"{blockers[0]} is not supported")
    return cfg


def peft_to_mlx(peft_dir: Path | str, out_dir: Path | str, num_layers_total: int | None = None) -> dict:
    """Convert the PEFT LoRA adapter in `peft_dir` into an mlx_lm adapter directory `out_dir`.

    `num_layers_total` is the base model's `num_hidden_layers` (None when unknown; see the
    module docstring). Writes `adapters.safetensors` and `adapter_config.json` (each atomically)
    and returns a summary: num_layers, rank, scale, keys, layers (PEFT's), padded_layers, dtype,
    tensors, source_sha256. Raises ValueError for an adapter it cannot convert exactly.
    """
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    cfg = _check_config(peft_dir)
    r, scale, dropout = cfg.r, cfg.scale(), cfg.lora_dropout
    weights = peft_dir / PEFT_WEIGHTS
    try:
        lora = SafetensorsFile(weights)
    except (OSError, ValueError) as exc:
        raise _refuse(peft_dir, f"cannot read {PEFT_WEIGHTS}: {exc}") from None
    header = lora.tensors

    pairs: dict[tuple[int, str], dict[str, str]] = {}  # (layer, module) -> {"A": name, "B": name}
    strange = []
    for name in sorted(header):
        m = _KEY.match(name)
        if m is None:
            strange.append(name)
            continue
        module = m["module"]
        if module not in SUPPORTED_MODULES:
            raise _refuse(
                peft_dir,
                f"target module {module!r} ({name}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODULES)}",
            )
        pairs.setdefault((int(m["layer"]), module), {})[m["ab"]] = name
    if strange:
        more = f" (and {len(strange) - 3} more)" if len(strange) > 3 else ""
        raise _refuse(
            peft_dir,
            f"tensors that are not lora_A/lora_B of a decoder layer's linear module: "
            f"{', '.join(strange[:3])}{more}",
        )
    if not pairs:
        raise _refuse(peft_dir, f"{PEFT_WEIGHTS} holds no lora_A/lora_B tensors")

    dtypes = set()
    shapes: dict[str, tuple[int, int]] = {}  # module -> (in, out)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise _refuse(peft_dir, f"layer {layer} {module} has no {missing}")
        a, b = header[ab["A"]], header[ab["B"]]
        for entry, tensor in ((a, ab["A"]), (b, ab["B"])):
            if entry.dtype not in _ITEMSIZE:
                raise _refuse(peft_dir, f"{tensor}: dtype {entry.dtype!r} (supported: F32, F16, BF16)")
            if len(entry.shape) != 2:
                raise _refuse(peft_dir, f"{tensor}: shape {list(entry.shape)} is not 2-D")
            dtypes.add(entry.dtype)
        (ra, fan_in), (fan_out, rb) = a.shape, b.shape
        if ra != r or rb != r:
            raise _refuse(
                peft_dir, f"layer {layer} {module}: rank {ra}/{rb} in the tensors, r={r} in the config"
            )
        if shapes.setdefault(module, (fan_in, fan_out)) != (fan_in, fan_out):
            raise _refuse(
                peft_dir, f"{module}: shape differs between layers ({shapes[module]} vs {fan_in, fan_out})"
            )
    if len(dtypes) > 1:
        raise _refuse(peft_dir, f"mixed tensor dtypes {sorted(dtypes)}")
    dtype = dtypes.pop()

    by_layer: dict[int, set[str]] = {}
    for layer, module in pairs:
        by_layer.setdefault(layer, set()).add(module)
    layers = sorted(by_layer)
    lo, hi = layers[0], layers[-1]
    if layers != list(range(lo, hi + 1)):
        gaps = sorted(set(range(lo, hi + 1)) - set(layers))
        raise _refuse(
            peft_dir,
            f"LoRA on a non-contiguous layer set (layers {lo}..{hi} without {gaps}); mlx_lm applies "
            "LoRA to the last num_layers blocks",
        )
    keys = sorted(by_layer[lo])
    for layer in layers:
        if sorted(by_layer[layer]) != keys:
            raise _refuse(
                peft_dir,
                f"layer {layer} adapts {sorted(by_layer[layer])} but layer {lo} adapts {keys}; mlx_lm "
                "uses the same modules in every adapted layer",
            )
    if num_layers_total is not None:
        if (
            isinstance(num_layers_total, bool)
            or not isinstance(num_layers_total, int)
            or num_layers_total <= 0
        ):
            raise ValueError(f"num_layers_total must be a positive integer, not {num_layers_total!r}")
        if hi >= num_layers_total:
            raise _refuse(peft_dir, f"it adapts layer {hi} but the base model has {num_layers_total} layers")
        last = num_layers_total - 1
    else:
        last = hi  # assumed: mlx_lm refuses the adapter at load time if hi is not the last layer

    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for (layer, module), ab in pairs.items():
        for which, leaf in (("A", "lora_a"), ("B", "lora_b")):
            shape, blob = _transpose(dtype, header[ab[which]].shape, lora.raw(ab[which]))
            out[f"model.layers.{layer}.{module}.{leaf}"] = (dtype, shape, blob)
    padded = list(range(hi + 1, last + 1))
    for layer in padded:  # exactly-zero updates, so mlx_lm's "last num_layers" covers lo..hi
        for module in keys:
            fan_in, fan_out = shapes[module]
            zeros = lambda n: bytes(n * _ITEMSIZE[dtype])  # noqa: E731
            out[f"model.layers.{layer}.{module}.lora_a"] = (dtype, (fan_in, r), zeros(fan_in * r))
            out[f"model.layers.{layer}.{module}.lora_b"] = (dtype, (r, fan_out), zeros(r * fan_out))

    source_sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    num_layers = last - lo + 1
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": r, "scale": scale, "dropout": dropout, "keys": keys},
        "adapterctl": {
            "converted_from": "peft",
            "source_sha256": source_sha256,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "peft_layers": [lo, hi],
            "padded_layers": padded,
            "num_layers_total": num_layers_total,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write(out_dir / MLX_WEIGHTS, out, {"format": "mlx", "source_sha256": source_sha256})
    tmp = out_dir / f".{MLX_CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MLX_CONFIG)
    return {
        "out_dir": str(out_dir),
        "num_layers": num_layers,
        "rank": r,
        "scale": scale,
        "keys": keys,
        "layers": layers,
        "padded_layers": padded,
        "assumed_last_layer": num_layers_total is None,
        "dtype": dtype,
        "tensors": len(out),
        "source_sha256": source_sha256,
    }
