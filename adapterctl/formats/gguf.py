"""GGUF files on the training box, read with llama.cpp's own `gguf` package (gguf-py's GGUFReader).

`gguf` comes with the gguf extra, pinned to the gguf-py that the pinned llama-cpp-python vendors
(the version that writes our GGUFs). Endpoints, which have only the standard library, read GGUF
headers with adapterctl.endpoint_ops.gguf_header instead.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

GGUF_FIX = "install the gguf extra on the training box: pip install -e '.[gguf]'"
_COMPARE_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ggml type id, shape (GGUF order), where its data is."""

    name: str
    type: int
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """The tensors of GGUF file `path`, by name (their data is mapped, not read).

    Raises ValueError for a file that is not a GGUF gguf-py can read (bad magic, unsupported
    version, truncated); ImportError (naming the fix) without the gguf package."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ImportError(f"reading GGUF tensors needs the gguf package ({exc}); {GGUF_FIX}") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError) as exc:  # gguf-py's errors for bad bytes
        raise ValueError(f"{path}: not a GGUF file, or a damaged or truncated one (gguf-py: {exc})") from None
    return {
        t.name: TensorInfo(
            t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes)
        )
        for t in reader.tensors
    }


def tensor_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (absolute data offset in the file, data bytes) of GGUF file `path`.

    Raises ValueError for a file that is not a readable GGUF (see tensor_infos)."""
    return {name: (t.offset, t.nbytes) for name, t in tensor_infos(path).items()}


def changed_tensors(old: Path, new: Path) -> dict[str, int]:
    """Name -> data bytes of each tensor of `new` whose bytes differ from the same-named tensor of
    `old`; a tensor only in `new`, or with another type or shape there, is listed whole. Tensor
    data is compared through read-only memory maps, 1 MiB at a time.

    Raises ValueError when either file is not a readable GGUF; OSError when one cannot be read."""
    before, after = tensor_infos(old), tensor_infos(new)
    changed: dict[str, int] = {}
    with open(old, "rb") as fo, open(new, "rb") as fn:
        # both are non-empty: tensor_infos read their headers
        mo = mmap.mmap(fo.fileno(), 0, access=mmap.ACCESS_READ)
        mn = mmap.mmap(fn.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for name, t in after.items():
                was = before.get(name)
                if was is None or (was.type, was.shape, was.nbytes) != (t.type, t.shape, t.nbytes):
                    changed[name] = t.nbytes
                    continue
                if was.offset + was.nbytes > len(mo) or t.offset + t.nbytes > len(mn):
                    raise ValueError(f"tensor {name}'s data runs past the end of {old} or {new}")
                for at in range(0, t.nbytes, _COMPARE_CHUNK):
                    n = min(_COMPARE_CHUNK, t.nbytes - at)
                    if mo[was.offset + at : was.offset + at + n] != mn[t.offset + at : t.offset + at + n]:
                        changed[name] = t.nbytes
                        break
        finally:
            mo.close()
            mn.close()
    return changed


def changed_tensor_bytes(old: Path, new: Path) -> int:
    """Total data bytes of the tensors of `new` whose bytes differ from `old` (see changed_tensors):
    what a delta transfer of `new` against `old` cannot avoid sending.

    Raises ValueError when either file is not a readable GGUF; OSError when one cannot be read."""
    return sum(changed_tensors(old, new).values())
