"""PEFT LoRA `adapter_config.json`: the one model of it, shared by registration and every converter.

`load` parses and validates the file into a frozen `LoraConfig`; a problem is a `PeftConfigError`
(a ValueError) whose message names the file and what is wrong, and whose `fix` says what to do.
Standard library only: the serving side (tinymodel on an endpoint) reads adapters too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

CONFIG_FILE = "adapter_config.json"

# config keys a plain W' = W + scale·B·A cannot express -> how messages name them
MERGE_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
    "lora_bias": "LoRA biases (lora_bias: true)",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


BIAS_VALUES = ("none", "all", "lora_only")


def _check_regex(pattern: str, what: str, bad) -> None:
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error as exc:
        raise bad(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


class PeftConfigError(ValueError):
    """adapter_config.json is missing, unreadable or not a LoRA config PEFT would load."""

    def __init__(self, path: Path, what: str, fix: str | None = None):
        super().__init__(f"{path}: {what}")
        self.path, self.what, self.fix = path, what, fix


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _number(value) and math.isfinite(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def pattern_matches(key: str, module: str) -> bool:
    """Whether a rank_pattern/alpha_pattern key applies to `module`, as PEFT matches it."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def _pattern_key(pattern: Mapping[str, Any], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key that matches the end of the module's name
    for key in pattern:
        if pattern_matches(key, module):
            return key
    return None


@dataclass(frozen=True)
class LoraConfig:
    """A PEFT LoRA adapter's config. Optional keys PEFT did not write get PEFT's defaults."""

    path: Path  # the adapter_config.json it was read from
    r: int
    lora_alpha: int | float
    peft_type: str | None = None  # None: not in the file
    target_modules: tuple[str, ...] | str | None = None  # a str is PEFT's regex form
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, int | float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def rank(self, module: str) -> int:
        """The module's rank: rank_pattern as PEFT applies it, else r."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha(self, module: str) -> int | float:
        """The module's lora_alpha: alpha_pattern as PEFT applies it, else lora_alpha."""
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale(self, module: str | None = None) -> float:
        """PEFT's scaling of B·A: alpha / r, or alpha / sqrt(r) with use_rslora."""
        r, alpha = (self.r, self.lora_alpha) if module is None else (self.rank(module), self.alpha(module))
        return float(alpha / math.sqrt(r) if self.use_rslora else alpha / r)

    def targets(self, module: str) -> bool:
        """Whether target_modules names `module` as PEFT matches it: by exact name, leaf name or
        dotted suffix ("self_attn.q_proj"). True for a regex (str) or absent target_modules, whose
        match depends on the base model's module names."""
        if self.target_modules is None or isinstance(self.target_modules, str):
            return True
        targets = self.target_modules
        return module.rsplit(".", 1)[-1] in targets or any(
            module == t or module.endswith("." + t) for t in targets
        )

    def merge_blockers(self) -> list[str]:
        """What a plain W + scale·B·A merge cannot express, worded for messages (empty: none)."""
        found = [
            f"{what} {self.raw[key]!r}" if key == "modules_to_save" else what
            for key, what in MERGE_UNSUPPORTED.items()
            if self.raw.get(key)
        ]
        if self.bias != "none":
            found.append(f"bias {self.bias!r} (only 'none')")
        return found

    def unsupported_by(self, fmt: str) -> list[str]:
        """What the artifact format `fmt` cannot express of this adapter, worded for messages (empty: all).

        adapter (mlx_lm's LoRA: one rank and scale everywhere) and fused (W + scale·B·A) take plain LoRA;
        merged (PEFT's own merge_and_unload) takes every variant but LoRA biases; lora (llama.cpp's GGUF
        LoRA) writes one alpha and scales by alpha/r, so per-module alphas and rsLoRA would go live wrong.
        """
        if fmt == "merged":
            return ["LoRA biases (lora_bias: true)"] if self.raw.get("lora_bias") else []
        found = self.merge_blockers() if fmt in ("adapter", "fused", "lora") else []
        if fmt == "adapter" and self.rank_pattern:
            found.append(f"per-module ranks (rank_pattern {dict(self.rank_pattern)!r})")
        if fmt in ("adapter", "lora") and self.alpha_pattern:
            found.append(f"per-module alphas (alpha_pattern {dict(self.alpha_pattern)!r})")
        if fmt == "lora" and self.use_rslora:
            found.append("rsLoRA scaling (use_rslora: true; llama.cpp scales by alpha/r)")
        return found

    def features(self) -> dict[str, Any]:
        """What decides whether an engine can load the adapter as plain LoRA: recorded per version."""
        return {
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "bias": self.bias,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }

    def summary(self) -> dict[str, Any]:
        """The keys a registered version records, as the file has them."""
        keys = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")
        return {k: self.raw[k] for k in keys if self.raw.get(k) is not None}


def load(path: Path | str, *, strict: bool = False) -> LoraConfig:
    """Parse `path` (an adapter directory or its adapter_config.json) into a LoraConfig.

    Always required: a JSON object, peft_type LORA if present, r a positive integer, lora_alpha
    a number, well-formed patterns. `strict` (registration) also requires peft_type and a
    non-empty target_modules, which PEFT always writes. Raises PeftConfigError.
    """
    path = Path(path)
    cfg_path = path if path.suffix == ".json" else path / CONFIG_FILE
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PeftConfigError(
            cfg_path, "missing", "a PEFT adapter directory needs adapter_config.json"
        ) from None
    except OSError as exc:
        raise PeftConfigError(cfg_path, f"cannot read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise PeftConfigError(cfg_path, f"not valid JSON: {exc}") from None
    return parse(text, cfg_path, strict=strict)


def strict_json(text: str) -> Any:
    """json.loads that refuses what Python's json accepts but JSON does not: NaN, Infinity,
    -Infinity, numbers too large for a float (1e999), and a key given twice in one object.
    Raises ValueError (json.JSONDecodeError for plain syntax errors)."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON (write a finite number or null)")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"key {key!r} appears twice in one object")
            out[key] = value
        return out

    def finite_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"{literal} is too large for a number")
        return value

    return json.loads(text, parse_constant=constant, object_pairs_hook=pairs, parse_float=finite_float)


def parse(text: str, cfg_path: Path, *, strict: bool = False) -> LoraConfig:
    """Parse the text of `cfg_path` (see load). Raises PeftConfigError."""
    try:
        cfg = strict_json(text)
    except ValueError as exc:
        raise PeftConfigError(cfg_path, f"not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise PeftConfigError(cfg_path, "must be a JSON object")

    def bad(what: str) -> PeftConfigError:
        return PeftConfigError(cfg_path, what, "fix adapter_config.json, or save the adapter again with PEFT")

    peft_type = cfg.get("peft_type")
    if (strict or peft_type is not None) and str(peft_type).upper() != "LORA":
        raise bad(f"peft_type is {peft_type!r}, expected 'LORA'")
    if "r" not in cfg:
        raise bad("missing 'r' (the LoRA rank)")
    if not _positive_int(cfg["r"]):
        raise bad(f"'r' must be a positive integer, got {cfg['r']!r}")
    if not _number(cfg.get("lora_alpha")):
        raise bad(f"'lora_alpha' missing or not a number (got {cfg.get('lora_alpha')!r})")
    if not _positive(cfg["lora_alpha"]):
        raise bad(f"'lora_alpha' must be a finite positive number, got {cfg['lora_alpha']!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not (targets is None or isinstance(targets, str)):
        raise bad(f"'target_modules' must be a list of module names or a regex, got {targets!r}")
    if strict and not targets:
        raise bad("'target_modules' missing or empty")
    patterns = {}
    for key, check, kind in (
        ("rank_pattern", _positive_int, "ranks (positive integers)"),
        ("alpha_pattern", _positive, "alphas (finite positive numbers)"),
    ):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and check(v) for k, v in pattern.items()
        ):
            raise bad(f"'{key}' must map module names to {kind}, got {pattern!r}")
        for k in pattern:
            _check_regex(k, f"'{key}' key", bad)
        patterns[key] = MappingProxyType(pattern)
    if isinstance(targets, str):
        _check_regex(targets, "'target_modules'", bad)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(f"'{key}' must be true or false, got {cfg[key]!r}")
    modules_to_save = cfg.get("modules_to_save")
    if isinstance(modules_to_save, list) and all(isinstance(m, str) for m in modules_to_save):
        modules_to_save = tuple(modules_to_save)
    elif modules_to_save is not None:
        raise bad(f"'modules_to_save' must be a list of module names or null, got {modules_to_save!r}")
    bias = cfg.get("bias") or "none"
    if bias not in BIAS_VALUES:
        raise bad(f"'bias' must be 'none', 'all' or 'lora_only', got {bias!r}")
    dropout = cfg.get("lora_dropout") or 0.0
    if not _number(dropout):
        raise bad(f"'lora_dropout' must be a number, got {dropout!r}")
    base = cfg.get("base_model_name_or_path")
    return LoraConfig(
        path=cfg_path,
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        peft_type=peft_type,
        target_modules=targets,
        lora_dropout=float(dropout),
        use_rslora=bool(cfg.get("use_rslora")),
        use_dora=bool(cfg.get("use_dora")),
        bias=bias,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        modules_to_save=modules_to_save,
        base_model_name_or_path=base if isinstance(base, str) else None,
        raw=MappingProxyType(cfg),
        **patterns,
    )
