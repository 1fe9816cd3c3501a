"""What a conversion is (DESIGN §5): formats, quant types, the specs, the errors. The leaf of the
convert package: its builders (mlx, gguf, fidelity) and its front (convert/__init__) import this."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import AdapterctlError, ConfigError, HealthCheckFailed, UsageError

CONVERTER_VERSION = "1"  # bump when any builder's output changes for the same inputs

FORMATS: dict[str, tuple[str, ...]] = {
    "mlx": ("adapter", "fused", "peft"),
    "gguf": ("merged", "lora", "peft"),
}
DEFAULT_FORMAT = {"mlx": "adapter", "gguf": "merged"}
DEFAULT_QUANT = "Q4_K_M"
NEEDS_BASE = ("fused", "merged", "lora")

# llama.cpp's file types (llama_ftype, llama-cpp-python 0.3.36) that quantize without extra input.
# The IQ*/TQ* types need an importance matrix (llama-quantize --imatrix), which we do not produce.
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S",
)  # fmt: skip
NEEDS_IMATRIX = (
    "IQ1_M", "IQ1_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_M", "IQ3_S", "IQ3_XS",
    "IQ3_XXS", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "NVFP4", "MXFP4_MOE",
)  # fmt: skip
UNQUANTIZED = ("F32", "F16", "BF16")

TOOLS = {  # distributions whose version enters the cache key, per format
    "adapter": ("numpy",),
    "fused": ("numpy",),
    "merged": ("torch", "transformers", "peft", "llama_cpp_python"),
    "lora": ("torch", "transformers", "peft", "llama_cpp_python"),
}
_REFERENCE = ("torch", "transformers", "peft")  # the fidelity check's PEFT original
FIDELITY_TOOLS = {
    "adapter": (*_REFERENCE, "mlx", "mlx-lm"),
    "fused": (*_REFERENCE, "mlx", "mlx-lm"),
    "merged": ("llama_cpp_python",),
    "lora": ("llama_cpp_python",),
}


class ConversionError(AdapterctlError):
    """A conversion could not be built (exit 1; nothing was sent to the endpoint)."""


class FidelityFailed(HealthCheckFailed):
    """The converted artifact does not behave like the PEFT original (exit 4, active untouched)."""

    report: dict | None = None  # the fidelity record, set by fidelity.check


class BaseMismatch(UsageError):
    """The configured base model is missing or is not the one the adapter applies to (exit 2)."""


def check_quant(quant: str) -> str:
    """The llama.cpp file type name for `quant` (case-insensitive); ConfigError for an unknown one."""
    name = quant.upper()
    if name in QUANT_TYPES:
        return name
    if name in NEEDS_IMATRIX:
        raise ConfigError(
            f"quant type {quant!r} needs an importance matrix, which adapterctl does not build",
            f"use one of: {', '.join(QUANT_TYPES)}",
        )
    raise ConfigError(
        f"quant type {quant!r} is not a llama.cpp file type", f"use one of: {', '.join(QUANT_TYPES)}"
    )


@dataclass(frozen=True)
class ConvertSpec:
    """How one endpoint kind wants a model's adapter: `kind` mlx|gguf, `format` (FORMATS[kind])."""

    kind: str
    format: str
    quant: str | None = None  # gguf merged: a QUANT_TYPES name (default Q4_K_M)
    fidelity: bool = True  # compare the artifact with the PEFT original on the health suite

    @property
    def passthrough(self) -> bool:
        return self.format == "peft"

    @property
    def needs_base(self) -> bool:
        return self.format in NEEDS_BASE

    @property
    def label(self) -> str:
        if self.passthrough:
            return "PEFT as is"
        what = {
            "adapter": "MLX adapter",
            "fused": "fused MLX model",
            "merged": "merged GGUF",
            "lora": "GGUF LoRA",
        }
        return what[self.format] + (f" {self.quant}" if self.quant else "")

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format, "quant": self.quant}


@dataclass(frozen=True)
class FidelitySpec:
    """What the fidelity check runs: the model's health suite cases, with the engine's prompt."""

    inputs: tuple[str, ...] = ()
    suite: Any = None  # health.suite.HealthSuite (None: no text suite, fidelity is not checked)
    prompt_template: str = "{input}\n"
    max_tokens: int = 64


def dist_version(name: str) -> str | None:
    """An installed distribution's version, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
