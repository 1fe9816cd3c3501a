"""Phase 1, version: validate a PEFT LoRA adapter, hash it, give it an id, store it.

Version id: cycle{N}_{YYYYMMDD}_{sha256(adapter_model.safetensors)[:8]} (DESIGN §2).
Same bytes twice → the existing id; same id with other bytes → VersionConflict.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from adapterctl.endpoint_ops import CHUNK, compare_files, fsync_dir, hash_files, sha256_file
from adapterctl.errors import AdapterInvalid, VersionConflict
from adapterctl.formats import peft
from adapterctl.formats.safetensors import read_header
from adapterctl.names import check_cycle, check_name

WEIGHTS = "adapter_model.safetensors"
CONFIG = peft.CONFIG_FILE
METRICS = "training_metrics.json"
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter directory."""

    path: Path
    files: dict[str, str]  # relative file name -> sha256
    size_bytes: int
    sha256: str  # of adapter_model.safetensors
    peft: dict[str, Any]
    base_model: str | None
    dtype: str
    lora_pairs: int
    training_metrics: dict[str, Any] | None


def version_id(cycle: int, when: datetime, sha256: str) -> str:
    return f"cycle{check_cycle(cycle)}_{when:%Y%m%d}_{sha256[:8]}"


def newest_adapter(source: Path) -> Path:
    """The adapter dir itself, or its newest subdirectory holding an adapter. Raises AdapterInvalid."""
    if (source / CONFIG).is_file() or (source / WEIGHTS).is_file():
        return source
    if not source.is_dir():
        raise AdapterInvalid(f"adapter source {source} does not exist", "fix `source:` in adapterctl.yaml")
    candidates = [d for d in source.iterdir() if d.is_dir() and (d / WEIGHTS).is_file()]
    if not candidates:
        raise AdapterInvalid(
            f"no adapter in {source}: neither it nor a subdirectory holds {WEIGHTS}",
            "point `source:` at the training output directory",
        )
    return max(candidates, key=lambda d: (d / WEIGHTS).stat().st_mtime)


def _load_config(path: Path) -> peft.LoraConfig:
    try:
        return peft.load(path, strict=True)
    except peft.PeftConfigError as exc:
        raise AdapterInvalid(str(exc), exc.fix) from None


def _check_tensors(path: Path, cfg: peft.LoraConfig) -> tuple[str, int]:
    """Read the safetensors header and check every lora_A/lora_B pair against r."""
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterInvalid(f"{weights}: missing")
    try:
        specs, _metadata = read_header(weights)
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(str(exc) if isinstance(exc, ValueError) else f"{weights}: {exc}") from None
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, spec in specs.items():
        m = _PAIR.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = spec.shape
    if not pairs:
        raise AdapterInvalid(f"{weights}: no lora_A/lora_B tensors found")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterInvalid(f"{weights}: {module} has no {missing} tensor")
        r = cfg.rank(module)
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2:
            raise AdapterInvalid(f"{weights}: {module}: LoRA tensors must be 2-D, got A{list(a)} B{list(b)}")
        a_rank, b_rank = a[0], b[1]  # lora_A is [r, in] (embedding: [r, vocab]); lora_B is [out, r]
        if a_rank != r:
            raise AdapterInvalid(f"{weights}: {module}.lora_A shape {list(a)} does not match r={r}")
        if b_rank != r:
            raise AdapterInvalid(f"{weights}: {module}.lora_B shape {list(b)} does not match r={r}")
        if not cfg.targets(module):
            raise AdapterInvalid(
                f"{weights}: tensor for {module} but target_modules is {list(cfg.target_modules or ())}",
                "the adapter_config.json does not belong to these weights",
            )
    dtypes = sorted({spec.dtype for spec in specs.values()})
    return (dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes)), len(pairs)


def inspect_adapter(path: Path) -> AdapterInfo:
    """Validate an adapter directory and hash every file. Raises AdapterInvalid."""
    if not path.is_dir():
        raise AdapterInvalid(f"adapter directory {path} does not exist")
    cfg = _load_config(path)
    dtype, n_pairs = _check_tensors(path, cfg)
    metrics = None
    if (path / METRICS).is_file():
        try:
            metrics = json.loads((path / METRICS).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterInvalid(f"{path / METRICS}: not valid JSON: {exc}") from None
        if not isinstance(metrics, dict):
            raise AdapterInvalid(f'{path / METRICS}: must be a JSON object like {{"final_loss": 0.42}}')
    # an adapter is the flat set of files PEFT saves; subdirectories (checkpoints, logs) stay behind
    files = {
        p.name: sha256_file(str(p))
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }
    size = sum((path / rel).stat().st_size for rel in files)
    return AdapterInfo(
        path=path,
        files=files,
        size_bytes=size,
        sha256=files[WEIGHTS],
        peft=cfg.summary(),
        base_model=cfg.base_model_name_or_path,
        dtype=dtype,
        lora_pairs=n_pairs,
        training_metrics=metrics,
    )


def manifest_entry(
    info: AdapterInfo, vid: str, cycle: int, created: str, registered_by: str
) -> dict[str, Any]:
    return {
        "version_id": vid,
        "created": created,
        "cycle": cycle,
        "sha256": info.sha256,
        "files": info.files,
        "base_model": info.base_model,
        "peft": info.peft,
        "dtype": info.dtype,
        "lora_pairs": info.lora_pairs,
        "size_bytes": info.size_bytes,
        "training_metrics": info.training_metrics,
        "provenance": {"source_path": str(info.path), "registered_by": registered_by},
        "retired": False,
    }


def check_existing(model: str, entry: dict[str, Any] | None, info: AdapterInfo) -> None:
    """Same weights but other files under one id is a conflict. Raises VersionConflict."""
    if entry is not None and entry["files"] != info.files:
        diff = "; ".join(compare_files(entry["files"], info.files))
        raise VersionConflict(
            f"model {model}: {info.path} has the weights of {entry['version_id']} but other files ({diff})",
            "registered versions are immutable: keep the original files, or retrain to get new weights",
        )


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy one file (fsynced) and return the sha256 of the bytes copied: one read pass."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(CHUNK):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def store_copy(store: Path, model: str, vid: str, info: AdapterInfo) -> Path:
    """Copy the adapter into the immutable store `store/{model}/{vid}/`, re-verifying hashes.

    The copy is assembled under a temp name and renamed, so the store never holds a partial
    version. Raises VersionConflict when the id exists with other bytes or the source changed.
    """
    dest = store / check_name("model", model) / vid
    if dest.exists():
        problems = compare_files(info.files, hash_files(str(dest)))
        if problems:
            raise VersionConflict(
                f"model {model}: {dest} already exists with different bytes ({'; '.join(problems)})",
                "the store is immutable; move the damaged directory aside and register again",
            )
        return dest
    tmp = dest.parent / f".{vid}.incoming.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    copied = {rel: _copy_hashed(info.path / rel, tmp / rel) for rel in info.files}
    problems = compare_files(info.files, copied)
    if problems:
        shutil.rmtree(tmp)
        raise VersionConflict(
            f"model {model}: {info.path} changed while it was being registered ({'; '.join(problems)})",
            "wait for training to finish writing, then retry",
        )
    for rel in info.files:
        os.chmod(tmp / rel, 0o444)
    os.rename(tmp, dest)
    fsync_dir(str(dest.parent))
    return dest
