"""Phase 1, version: validate a PEFT LoRA adapter, hash it, give it an id, store it.

Version id: cycle{N}_{YYYYMMDD}_{sha256(adapter_model.safetensors)[:8]} (DESIGN §2).
Same bytes twice → the existing id; same id with other bytes → VersionConflict.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from adapterctl.endpoint_ops import CHUNK, compare_files, fsync_dir, list_files, sha256_file
from adapterctl.errors import AdapterInvalid, VersionConflict
from adapterctl.formats import peft
from adapterctl.formats.safetensors import read_checking_finite, read_header
from adapterctl.names import check_cycle, check_name

WEIGHTS = "adapter_model.safetensors"
CONFIG = peft.CONFIG_FILE
METRICS = "training_metrics.json"
# what is registered and shipped: the PEFT weights and config, the tokenizer files engines load,
# and the training metrics. Anything else in the directory stays behind ("not shipped").
SHIPPED = frozenset(
    {
        WEIGHTS,
        CONFIG,
        METRICS,
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
SHIPPED_PREFIXES = ("chat_template",)  # chat_template.jinja, chat_template.json
FLOAT_DTYPES = ("F16", "BF16", "F32")
_SPECIAL = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
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
    features: dict[str, Any] = field(default_factory=dict)  # peft.LoraConfig.features()
    not_shipped: tuple[tuple[str, int], ...] = ()  # (name, bytes) left in the directory


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


def is_shipped(name: str) -> bool:
    """Whether a top-level file of an adapter directory is registered and shipped (the allowlist)."""
    return name in SHIPPED or (name.startswith(SHIPPED_PREFIXES) and not name.startswith("."))


def _refuse_special(path: str, st: os.stat_result) -> None:
    for test, what in _SPECIAL:
        if test(st.st_mode):
            target = f" to {os.readlink(path)}" if stat.S_ISLNK(st.st_mode) else ""
            raise AdapterInvalid(
                f"{path}: is {what}{target}; an adapter directory may hold only regular files",
                "copy the real file into the adapter directory (or remove the entry), then retry",
            )


def _tree_size(path: str) -> int:
    """Bytes under a directory that is not shipped; refuses a symlink or special file in it."""
    total = 0
    with os.scandir(path) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            _refuse_special(entry.path, st)
            total += _tree_size(entry.path) if stat.S_ISDIR(st.st_mode) else st.st_size
    return total


def scan_adapter_dir(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(files to ship, [(name, bytes) not shipped]) of an adapter directory, names sorted.

    Only regular files and directories may be anywhere in it: a symlink (to a file or a directory,
    inside or outside), FIFO, socket or device is refused, naming its path. Raises AdapterInvalid.
    """
    shipped: list[str] = []
    left: list[tuple[str, int]] = []
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        _refuse_special(entry.path, st)
        if stat.S_ISDIR(st.st_mode):
            left.append((entry.name + "/", _tree_size(entry.path)))
        elif is_shipped(entry.name):
            shipped.append(entry.name)
        else:
            left.append((entry.name, st.st_size))
    return shipped, left


def _open_regular(path: Path):
    """Open a file for reading without following a symlink or blocking on a FIFO swapped in since
    the scan; returns (file, fstat before reading). Raises AdapterInvalid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise AdapterInvalid(f"{path}: cannot read: {exc.strerror}") from None
    before = os.fstat(fd)
    if not stat.S_ISREG(before.st_mode):
        os.close(fd)
        _refuse_special(str(path), before)
        raise AdapterInvalid(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), before


def _check_unchanged(path: Path, fh, before: os.stat_result) -> None:
    after = os.fstat(fh.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (
        fh.tell() != before.st_size
    ):
        raise AdapterInvalid(
            f"{path}: changed while it was being read (size {before.st_size} → {after.st_size}, "
            f"mtime_ns {before.st_mtime_ns} → {after.st_mtime_ns})",
            "wait for training to finish writing, then retry",
        )


def _read_small(path: Path) -> tuple[bytes, str]:
    """(bytes, sha256) of a small file, read once and refused if it changed meanwhile."""
    fh, before = _open_regular(path)
    with fh:
        data = fh.read()
        _check_unchanged(path, fh, before)
    return data, hashlib.sha256(data).hexdigest()


def _hash_file(path: Path) -> str:
    """sha256 of a file in one streamed pass, refused if it changed meanwhile."""
    h = hashlib.sha256()
    fh, before = _open_regular(path)
    with fh:
        while block := fh.read(CHUNK):
            h.update(block)
        _check_unchanged(path, fh, before)
    return h.hexdigest()


def hash_weights(path: Path) -> str:
    """sha256 of adapter_model.safetensors, checking in the same single read pass that every float
    value is finite. Raises AdapterInvalid naming the first tensor that holds a NaN or an Inf."""
    h = hashlib.sha256()
    fh, before = _open_regular(path)
    with fh:
        try:
            bad = read_checking_finite(fh, h.update, CHUNK)
        except ValueError as exc:
            raise AdapterInvalid(f"{path}: {exc}") from None
        if bad is None:
            _check_unchanged(path, fh, before)
    if bad is not None:
        raise AdapterInvalid(
            f"{path}: tensor {bad} holds NaN or Inf values",
            "the training diverged: retrain (lower the learning rate) or pick an earlier checkpoint",
        )
    return h.hexdigest()


def _load_config(path: Path, text: bytes) -> peft.LoraConfig:
    try:
        return peft.parse(text.decode("utf-8"), path, strict=True)
    except UnicodeDecodeError as exc:
        raise AdapterInvalid(f"{path}: not valid JSON: {exc}") from None
    except peft.PeftConfigError as exc:
        raise AdapterInvalid(str(exc), exc.fix) from None


def _load_metrics(path: Path, text: bytes) -> dict[str, Any]:
    try:
        metrics = peft.strict_json(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterInvalid(
            f"{path}: not valid JSON: {exc}", 'write a JSON object like {"final_loss": 0.42}'
        ) from None
    if not isinstance(metrics, dict):
        raise AdapterInvalid(f'{path}: must be a JSON object like {{"final_loss": 0.42}}')
    return metrics


def _peft_extra(name: str, cfg: peft.LoraConfig) -> bool:
    """Whether a tensor that is not lora_A/lora_B is one PEFT saves for a declared feature."""
    if "lora_magnitude_vector" in name:  # DoRA
        return cfg.use_dora
    if name.endswith(".bias"):
        return cfg.bias != "none" or bool(cfg.raw.get("lora_bias"))
    if "trainable_tokens" in name:
        return bool(cfg.raw.get("trainable_token_indices"))
    return any(f".{m}." in f".{name}" for m in cfg.modules_to_save or ())


def _check_tensors(path: Path, cfg: peft.LoraConfig) -> tuple[str, int]:
    """Read the safetensors header; check dtypes and every lora_A/lora_B pair against r."""
    weights = path / WEIGHTS
    try:
        specs, _metadata = read_header(weights)
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(str(exc) if isinstance(exc, ValueError) else f"{weights}: {exc}") from None
    for name, spec in sorted(specs.items()):
        if spec.dtype not in FLOAT_DTYPES:
            raise AdapterInvalid(
                f"{weights}: tensor {name} is {spec.dtype}; LoRA weights must be F16, BF16 or F32",
                "save the adapter again from the trained float model",
            )
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, spec in specs.items():
        m = _PAIR.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = spec.shape
    if not pairs:
        raise AdapterInvalid(f"{weights}: no lora_A/lora_B tensors found")
    for name in sorted(specs):
        if not _PAIR.match(name) and not _peft_extra(name, cfg):
            raise AdapterInvalid(
                f"{weights}: tensor {name} is neither a lora_A/lora_B tensor nor one that "
                "use_dora, bias or modules_to_save in adapter_config.json declares",
                "the file holds more than this LoRA adapter: save it again with PEFT's save_pretrained",
            )
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
    for key, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for entry in pattern:
            if not any(peft.pattern_matches(entry, module) for module in pairs):
                raise AdapterInvalid(
                    f"{cfg.path}: {key} key {entry!r} matches none of the adapted modules",
                    "the adapter_config.json does not belong to these weights",
                )
    dtypes = sorted({spec.dtype for spec in specs.values()})
    return (dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes)), len(pairs)


def inspect_adapter(path: Path) -> AdapterInfo:
    """Validate an adapter directory and hash every file it ships. Raises AdapterInvalid.

    Every shipped byte is read once here: the config and metrics are parsed from the bytes that
    were hashed, and the weights are checked finite in the pass that hashes them.
    """
    if not path.is_dir():
        raise AdapterInvalid(f"adapter directory {path} does not exist")
    shipped, left = scan_adapter_dir(path)
    if CONFIG not in shipped:
        raise AdapterInvalid(
            f"{path / CONFIG}: missing", "a PEFT adapter directory needs adapter_config.json"
        )
    if WEIGHTS not in shipped:
        raise AdapterInvalid(f"{path / WEIGHTS}: missing")
    files: dict[str, str] = {}
    config_bytes, files[CONFIG] = _read_small(path / CONFIG)
    cfg = _load_config(path / CONFIG, config_bytes)
    dtype, n_pairs = _check_tensors(path, cfg)
    metrics = None
    if METRICS in shipped:
        metrics_bytes, files[METRICS] = _read_small(path / METRICS)
        metrics = _load_metrics(path / METRICS, metrics_bytes)
    files[WEIGHTS] = hash_weights(path / WEIGHTS)
    for rel in shipped:
        if rel not in files:
            files[rel] = _hash_file(path / rel)
    files = dict(sorted(files.items()))
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
        features=cfg.features(),
        not_shipped=tuple(left),
    )


def report_not_shipped(info: AdapterInfo, out=None) -> None:
    """List once, on stderr, what stays behind in the adapter directory."""
    from adapterctl.units import human_bytes

    out = out or sys.stderr
    for name, size in info.not_shipped:
        print(f"not shipped: {name} ({human_bytes(size)})", file=out, flush=True)


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
        "features": info.features,
        "provenance": {"source_path": str(info.path), "registered_by": registered_by},
        "retired": False,
    }


def check_existing(model: str, entry: dict[str, Any] | None, info: AdapterInfo) -> None:
    """Same weights but other files under one id is a conflict. Raises VersionConflict.

    Files off the allowlist in an entry registered before there was one (a README.md) do not count.
    """
    recorded = {rel: sha for rel, sha in entry["files"].items() if is_shipped(rel)} if entry else None
    if entry is not None and recorded != info.files:
        diff = "; ".join(compare_files(recorded, info.files))
        raise VersionConflict(
            f"model {model}: {info.path} has the weights of {entry['version_id']} but other files ({diff})",
            "registered versions are immutable: keep the original files, or retrain to get new weights",
        )


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy one file (fsynced) and return the sha256 of the bytes copied: one read pass."""
    h = hashlib.sha256()
    fi, _before = _open_regular(src)  # no symlink swapped in since the scan is followed
    with fi, open(dst, "wb") as fo:
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
        stored = {rel: sha256_file(str(dest / rel)) for rel in list_files(str(dest)) if is_shipped(rel)}
        problems = compare_files(info.files, stored)
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
    try:
        copied = {rel: _copy_hashed(info.path / rel, tmp / rel) for rel in info.files}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
