"""One conversion's inputs (Job), its cache key, and the artifact it produces."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.convert.spec import (
    CONVERTER_VERSION,
    FIDELITY_TOOLS,
    TOOLS,
    ConvertSpec,
    FidelitySpec,
    dist_version,
)
from adapterctl.convert.tools import converter_info, tools_dir
from adapterctl.errors import AdapterctlError


@dataclass(frozen=True)
class Job:
    """Everything one conversion reads; its cache key is computed from these values only."""

    model: str
    version: str
    spec: ConvertSpec
    source_dir: Path  # the registered (immutable) store copy of the version
    source_files: Mapping[str, str]  # file -> sha256, from the manifest
    base_dir: Path | None = None
    base_digest: str | None = None
    fidelity: FidelitySpec = field(default_factory=FidelitySpec)

    def key(self) -> str:
        return cache_key(self)


@dataclass(frozen=True)
class Artifact:
    """A complete, verified cache entry (or, for `peft`, the store copy itself)."""

    key: str | None
    dir: Path
    files: dict[str, str]  # file -> sha256: what is shipped
    size_bytes: int
    meta: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The manifest's record of this artifact (DESIGN §4, per version under `artifacts`)."""
        keep = ("format", "kind", "quant", "tools", "fidelity", "fallbacks", "base_digest", "seconds")
        return {"key": self.key, "files": self.files, "size_bytes": self.size_bytes} | {
            k: self.meta[k] for k in keep if k in self.meta
        }


def tool_versions(spec: ConvertSpec) -> dict[str, str | None]:
    names = TOOLS.get(spec.format, ()) + (FIDELITY_TOOLS.get(spec.format, ()) if spec.fidelity else ())
    out = {"adapterctl-converter": CONVERTER_VERSION} | {n: dist_version(n) for n in names}
    if spec.format in ("merged", "lora"):  # llama.cpp's converter scripts, wherever they were put
        out["llama_cpp_tools"] = _llama_cpp_tools_digest()
    return out


def _llama_cpp_tools_digest() -> str | None:
    try:
        return converter_info(tools_dir())["convert_hf_to_gguf"].get("scripts_sha256")
    except AdapterctlError:
        return None  # no tools: the conversion itself fails with the fix


def cache_key(job: Job) -> str:
    doc = {
        "files": dict(sorted(job.source_files.items())),
        "base": job.base_digest,
        "spec": job.spec.params(),
        "fidelity": job.spec.fidelity
        and [list(job.fidelity.inputs), job.fidelity.prompt_template, job.fidelity.max_tokens],
        "tools": tool_versions(job.spec),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
