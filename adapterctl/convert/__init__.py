"""Phase 2, convert (DESIGN §5): the artifact each endpoint kind loads, built on the training box.

    mlx  adapter  PEFT → mlx_lm adapter (adapters.safetensors + adapter_config.json), numpy only
    mlx  fused    base + LoRA merged into one model directory mlx_lm loads without an adapter
    gguf merged   base + LoRA merged (PEFT merge_and_unload), llama.cpp's HF→GGUF converter,
                  quantized with llama-cpp-python (default Q4_K_M) → model.gguf
    gguf lora     the LoRA as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py) → adapter.gguf,
                  for endpoints that keep a base GGUF and load the adapter on top
    *    peft     nothing: the PEFT files are shipped as they are

Outputs are cached under `{store}/.cache/convert/{key}/`, key = sha256 of (source file hashes,
base model digest, format, quant type, options, converter and tool versions). A cache entry is
complete when its ARTIFACT.json exists (written last); every use re-hashes its files, and an
entry that does not match (truncated, corrupted) is removed and rebuilt, never shipped.

This module imports no heavy package: the builders (mlx.py, gguf.py) and the fidelity check
(fidelity.py) import torch/transformers/peft/mlx/llama_cpp inside their functions. Imports point
one way: this module → builders → job.py (Job, cache key) → tools.py (llama.cpp's scripts) → spec.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl.convert.job import Artifact, Job, cache_key, tool_versions
from adapterctl.convert.spec import (
    CONVERTER_VERSION,
    DEFAULT_FORMAT,
    DEFAULT_QUANT,
    FIDELITY_TOOLS,
    FORMATS,
    NEEDS_BASE,
    NEEDS_IMATRIX,
    QUANT_TYPES,
    TOOLS,
    UNQUANTIZED,
    BaseMismatch,
    ConversionError,
    ConvertSpec,
    FidelityFailed,
    FidelitySpec,
    check_quant,
    dist_version,
)
from adapterctl.endpoint_ops import atomic_write_json, fsync_dir, pid_alive, sha256_file
from adapterctl.errors import AdapterctlError
from adapterctl.formats.safetensors import read_header

__all__ = [  # the package's API; spec.py and job.py hold what the builders share with it
    "ARTIFACT_FILE",
    "CONVERTER_VERSION",
    "DEFAULT_FORMAT",
    "DEFAULT_QUANT",
    "FIDELITY_TOOLS",
    "FORMATS",
    "NEEDS_BASE",
    "NEEDS_IMATRIX",
    "QUANT_TYPES",
    "TOOLS",
    "UNQUANTIZED",
    "Artifact",
    "BaseMismatch",
    "Cache",
    "ConversionError",
    "ConvertSpec",
    "FidelityFailed",
    "FidelitySpec",
    "Job",
    "base_digest",
    "base_shapes",
    "cache_key",
    "check_base",
    "check_quant",
    "dist_version",
    "fidelity_spec",
    "passthrough",
    "run",
    "spec_for",
    "tool_versions",
]

ARTIFACT_FILE = "ARTIFACT.json"
CACHE_DIR = Path(".cache") / "convert"


class Cache:
    """`{store}/.cache/convert/`: one directory per key, complete once ARTIFACT.json exists."""

    def __init__(self, store: Path):
        self.root = store / CACHE_DIR

    def entry(self, key: str) -> Path:
        return self.root / key

    def peek(self, key: str) -> dict[str, Any] | None:
        """The entry's ARTIFACT.json, unverified (for planning); None when absent or unreadable."""
        try:
            doc = json.loads((self.entry(key) / ARTIFACT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None

    def lookup(self, key: str) -> tuple[Artifact | None, str | None]:
        """(artifact, None) for a complete entry whose files hash as recorded; (None, why) when the
        entry exists but is damaged (it is removed, so it gets rebuilt); (None, None) when absent."""
        doc = self.peek(key)
        path = self.entry(key)
        if doc is None:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                return None, "incomplete (no ARTIFACT.json)"
            return None, None
        for name, sha in doc["files"].items():
            f = path / name
            if not f.is_file():
                why = f"{name} is missing"
            elif (size := f.stat().st_size) != doc.get("sizes", {}).get(name, size):
                why = f"{name} is {size} bytes, {doc['sizes'][name]} recorded (truncated?)"
            elif sha256_file(str(f)) != sha:
                why = f"{name} does not match its recorded sha256"
            else:
                continue
            shutil.rmtree(path, ignore_errors=True)
            return None, why
        return Artifact(key, path, dict(doc["files"]), int(doc["size_bytes"]), doc), None

    def publish(self, key: str, built: Path, meta: dict[str, Any]) -> Artifact:
        """Hash the files in `built` (a temp dir beside the entry), write ARTIFACT.json last, fsync,
        rename into place. Returns the artifact."""
        files, sizes = {}, {}
        for f in sorted(p for p in built.rglob("*") if p.is_file()):
            rel = f.relative_to(built).as_posix()
            files[rel], sizes[rel] = sha256_file(str(f)), f.stat().st_size
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        doc = dict(meta, key=key, files=files, sizes=sizes, size_bytes=sum(sizes.values()))
        atomic_write_json(str(built / ARTIFACT_FILE), doc)  # last: it marks the entry complete
        final = self.entry(key)
        if final.exists():  # a concurrent run finished first; both are the same bytes by key
            shutil.rmtree(built, ignore_errors=True)
        else:
            os.rename(built, final)
            fsync_dir(str(self.root))
        artifact, why = self.lookup(key)
        if artifact is None:
            raise ConversionError(f"conversion cache entry {final} is unusable right after writing: {why}")
        return artifact

    def prune(self, keep: set[str], dry_run: bool = False) -> list[tuple[str, int]]:
        """Remove every entry whose key is not in `keep`, and scratch dirs of runs that died;
        (name, bytes) of each removed. The cached base GGUFs (`base-gguf-*`) are kept."""
        removed = []
        if not self.root.is_dir():
            return removed
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name.startswith("base-gguf-") or name in keep or not path.is_dir():
                continue
            if name.startswith("."):  # .{key}.tmp-{pid}: a build in progress unless its pid is gone
                pid = name.rsplit("-", 1)[-1]
                if pid.isdigit() and pid_alive(int(pid)):
                    continue
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
            removed.append((name, size))
        return removed

    def scratch(self, key: str) -> Path:
        path = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# -- base model -------------------------------------------------------------------------------
_BASE_FILES = (".json", ".safetensors", ".model", ".bin", ".txt", ".tiktoken")


def base_digest(base_dir: Path, store: Path, persist: bool = True) -> str:
    """sha256 over the base model directory's files (name + sha256 each). File hashes are cached
    in `{store}/.cache/base-digests.json` by (path, size, mtime_ns, inode), so a multi-GB base is
    hashed once, not on every deploy; `persist` False (planning) reads that cache, never writes."""
    with _DIGEST_LOCK:  # endpoints convert in parallel threads; one writer of the cache file at a time
        return _base_digest(base_dir, store / ".cache" / "base-digests.json", persist)


_DIGEST_LOCK = threading.Lock()


def _base_digest(base_dir: Path, cache_file: Path, persist: bool) -> str:
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    entries, changed = [], False
    for f in sorted(p for p in base_dir.rglob("*") if p.is_file() and p.name.endswith(_BASE_FILES)):
        st = f.stat()
        stamp = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        sha = known.get(stamp)
        if sha is None:
            sha, changed = sha256_file(str(f)), True
            known[stamp] = sha
        entries.append(f"{f.relative_to(base_dir).as_posix()} {sha}")
    if changed and persist:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(str(cache_file), known)
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    return {name: list(spec.shape) for name, spec in read_header(path)[0].items()}


def base_shapes(base_dir: Path) -> dict[str, list[int]]:
    """Weight name -> shape of the base model, from its safetensors headers (no weights read)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(f))
    return shapes


def check_base(model: str, base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Refuse (BaseMismatch, one line) a base model directory the adapter cannot apply to:
    missing, no config.json/safetensors, or a LoRA module whose in/out features differ from the
    base weight's shape (another hidden size, another model). Returns the base's config.json."""
    if not base_dir.is_dir():
        raise BaseMismatch(
            f"model {model}: base model directory {base_dir} does not exist",
            f"set models.{model}.base_dir to the base model (Hugging Face layout) on this machine",
        )
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        shapes = base_shapes(base_dir)
    except (OSError, ValueError) as exc:
        raise BaseMismatch(
            f"model {model}: base model directory {base_dir} is unreadable: {exc}",
            "it must hold config.json and *.safetensors (Hugging Face layout)",
        ) from None
    if not shapes:
        raise BaseMismatch(
            f"model {model}: base model directory {base_dir} holds no *.safetensors weights",
            "point base_dir at the Hugging Face model directory (config.json + *.safetensors)",
        )
    lora = _safetensors_shapes(adapter_dir / "adapter_model.safetensors")
    for name, shape in sorted(lora.items()):
        if ".lora_A." not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        weight = shapes.get(module + ".weight")
        b_shape = lora.get(name.replace(".lora_A.", ".lora_B."))
        if weight is None:
            raise BaseMismatch(
                f"model {model}: the adapter changes {module}, which base model {base_dir} does not have "
                f"(a different model?)",
                "set base_dir to the model the adapter was trained on",
            )
        want = [b_shape[0] if b_shape else weight[0], shape[1]]  # (out_features, in_features)
        if list(weight[:2]) != want:
            raise BaseMismatch(
                f"model {model}: base model {base_dir} does not match the adapter: {module} is "
                f"{weight[0]}×{weight[1]} in the base, the LoRA expects {want[0]}×{want[1]} "
                f"(hidden_size {config.get('hidden_size')} in the base)",
                "set base_dir to the model the adapter was trained on",
            )
    return config


# -- running ----------------------------------------------------------------------------------
Builder = Callable[[Job, Path, Callable[[str], None]], dict[str, Any]]


def _builders() -> dict[str, Builder]:
    from adapterctl.convert import gguf, mlx

    return {
        "adapter": mlx.build_adapter,
        "fused": mlx.build_fused,
        "merged": gguf.build_merged,
        "lora": gguf.build_lora,
    }


def passthrough(job: Job) -> Artifact:
    files = dict(job.source_files)
    size = sum((job.source_dir / f).stat().st_size for f in files)
    return Artifact(None, job.source_dir, files, size, {"format": "peft", "kind": job.spec.kind})


def run(job: Job, cache: Cache, progress: Callable[[str], None] = lambda line: None) -> tuple[Artifact, str]:
    """The artifact for `job`: from the cache when intact, else built, fidelity-checked and cached.

    Returns (artifact, how) with how one of "passthrough", "cached", "built", "rebuilt: <why>".
    """
    if job.spec.passthrough:
        return passthrough(job), "passthrough"
    key = job.key()
    artifact, damaged = cache.lookup(key)
    if artifact is not None:
        return artifact, "cached"
    if damaged:
        progress(f"conversion cache entry {key} is damaged ({damaged}): removed, rebuilding")
    from adapterctl.convert import fidelity

    started = time.monotonic()
    scratch = cache.scratch(key)
    try:
        out = scratch / "out"
        out.mkdir()
        meta = _builders()[job.spec.format](job, out, progress)
        meta.update(
            kind=job.spec.kind,
            format=job.spec.format,
            quant=job.spec.quant,
            model=job.model,
            version=job.version,
            base_digest=job.base_digest,
            tools=tool_versions(job.spec),
        )
        meta["fidelity"] = fidelity.check(job, out, meta, scratch, progress)
        meta.pop("_paths", None)  # the builder's intermediates (unquantized GGUF, base GGUF) in scratch
        meta["seconds"] = round(time.monotonic() - started, 2)
        artifact = cache.publish(key, out, meta)
    except AdapterctlError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(
            f"model {job.model} {job.version}: {job.spec.label} conversion failed: "
            f"{type(exc).__name__}: {exc}",
            "rerun with --debug for the converter's output",
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return artifact, f"rebuilt ({damaged})" if damaged else "built"


def spec_for(model: Any, ep: Any) -> ConvertSpec:
    """The conversion `ep` (config.EndpointConfig) wants for `model` (config.ModelConfig): the
    endpoint's `convert`, else the model's for the endpoint's kind, else the kind's default."""
    kind = ep.kind
    layers = [s for s in (ep.convert, model.convert.get(kind)) if s is not None]
    fmt = next((s.format for s in layers if s.format), DEFAULT_FORMAT[kind])
    quant = next((s.quant for s in layers if s.quant), None)
    fidelity = next((s.fidelity for s in layers if s.fidelity is not None), True)
    quant = (quant or DEFAULT_QUANT) if fmt == "merged" else None
    return ConvertSpec(kind, fmt, quant, fidelity)


def fidelity_spec(model: Any, config_dir: Path) -> FidelitySpec:
    """The fidelity check's cases and prompt, from the model's health config (config.ModelConfig):
    its suite's inputs, and the mlx/llamacpp engines' prompt_template and max_tokens."""
    from adapterctl.health import resolve_suite

    health = model.health
    if health is None or health.suite == "none":
        return FidelitySpec()
    suite = resolve_suite(health.suite, config_dir)
    if suite is None:
        return FidelitySpec()
    return FidelitySpec(
        tuple(c.input for c in suite.cases),
        suite,
        health.prompt_template or "{input}\n",
        health.max_tokens or 64,
    )
