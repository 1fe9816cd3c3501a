"""safetensors files: the one reader and writer of them in adapterctl.

The safetensors library checks every file read here (header, offsets, sizes, duplicate names), so
adapterctl refuses exactly what the loaders refuse. Its numpy API has no bfloat16, though, so
tensors whose bits must survive (BF16 adapters, base shards copied into a fused model) are read as
raw bytes through a memory map, at the offsets of the header the library has just validated, and
written by `write` byte for byte. Callers get ValueError (naming the file) for a file that is not
valid safetensors, OSError when it cannot be read.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# the float dtypes read as float32; BF16 is read as its 16 raw bits and widened by hand
FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's header entry; begin/end are its data_offsets (relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


def read_header(path: Path | str) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """(name -> TensorSpec without offsets, __metadata__) of a safetensors file, from the library.

    Reads no tensor data. Raises ValueError for a file the library refuses, OSError when unreadable.
    """
    from safetensors import safe_open  # light, but keeps `adapterctl --help` free of it

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            specs = {}
            for name in f.keys():
                view = f.get_slice(name)
                specs[name] = TensorSpec(view.get_dtype(), tuple(view.get_shape()))
    except OSError:
        raise
    except Exception as exc:  # SafetensorError, and whatever else the Rust side raises for a bad header
        raise ValueError(f"{path}: safetensors header does not parse: {exc}") from None
    return specs, dict(metadata)


# the exponent bits of the 16-bit floats: all set means Inf or NaN (F32 goes through np.isfinite)
_EXPONENT16 = {"F16": 0x7C00, "BF16": 0x7F80}


def read_checking_finite(fh: BinaryIO, update: Callable[[bytes], Any], chunk: int) -> str | None:
    """Read the open safetensors file `fh` from its start to EOF exactly once, passing every block to
    `update` (a hash, a copy), and check on the way that every F16/BF16/F32 value is finite.

    Returns the name of the first tensor holding a NaN or an Inf (it stops reading there), or None.
    Call it on a file `read_header` accepted: raises ValueError when the header does not parse.
    """
    import numpy as np

    head = fh.read(8)
    update(head)
    raw = fh.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
    update(raw)
    try:
        header = json.loads(raw)
        spans = sorted(
            (spec["data_offsets"][0], spec["data_offsets"][1], name, spec["dtype"])
            for name, spec in header.items()
            if name != "__metadata__"
        )
    except (ValueError, TypeError, KeyError, IndexError):
        raise ValueError("safetensors header does not parse") from None
    pos = 0
    for begin, end, name, dtype in spans:
        for _ in _blocks(fh, begin - pos, chunk, update):  # a gap (none in a valid file): hash only
            pass
        mask = _EXPONENT16.get(dtype)
        for block in _blocks(fh, end - max(begin, pos), chunk - chunk % 4, update):
            if dtype == "F32":
                bad = not np.isfinite(np.frombuffer(block, "<f4", len(block) // 4)).all()
            elif mask is not None:  # the largest masked value is the mask itself iff one is Inf/NaN
                bits = np.frombuffer(block, "<u2", len(block) // 2)
                bad = bits.size > 0 and int(np.bitwise_and(bits, mask).max()) == mask
            else:
                bad = False  # other dtypes are refused from the header before this pass
            if bad:
                return name
        pos = max(pos, end)
    while block := fh.read(chunk):
        update(block)
    return None


def _blocks(fh: BinaryIO, n: int, chunk: int, update: Callable[[bytes], Any]) -> Iterator[bytes]:
    while n > 0:
        block = fh.read(min(chunk, n))
        if not block:
            return
        update(block)
        n -= len(block)
        yield block


class SafetensorsFile:
    """A safetensors file the library validated, memory-mapped: `tensors` (name -> TensorSpec with
    offsets), `metadata`, and zero-copy `raw()` bytes of any dtype (BF16 included)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        specs, self.metadata = read_header(self.path)
        with open(self.path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        size = int.from_bytes(self._map[:8], "little")
        self._start = 8 + size
        # the library validated this header but does not expose the offsets: read just those
        header = json.loads(bytes(self._map[8 : self._start]))
        self.tensors: dict[str, TensorSpec] = {
            name: TensorSpec(spec.dtype, spec.shape, *header[name]["data_offsets"])
            for name, spec in specs.items()
        }

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as stored (little-endian), without copying."""
        spec = self.tensors[name]
        return memoryview(self._map)[self._start + spec.begin : self._start + spec.end]

    def float32(self, name: str):
        """The tensor as a float32 numpy array (F32, F16, BF16). Raises ValueError for other dtypes."""
        import numpy as np

        spec = self.tensors[name]
        if spec.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} is {spec.dtype}, not F32/F16/BF16")
        array = np.frombuffer(self.raw(name), dtype=FLOAT_DTYPES[spec.dtype])
        if spec.dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32, copy=False).reshape(spec.shape)

    def float32_all(self) -> dict[str, Any]:
        """Every tensor as float32 (see float32)."""
        return {name: self.float32(name) for name in self.tensors}


def encode(array, dtype: str) -> bytes:
    """float32 array → raw little-endian bytes of `dtype` (F32, F16, BF16); BF16 rounds to nearest
    even, as torch does."""
    import numpy as np

    if dtype == "F32":
        return np.ascontiguousarray(array, "<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(array.astype("<f2")).tobytes()
    if dtype != "BF16":
        raise ValueError(f"cannot encode {dtype} (only F32, F16, BF16)")
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(array)] = 0x7FC0  # rounding could carry a NaN's payload into the exponent
    return rounded.astype("<u2").tobytes()


def write(path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...], Any]], metadata: Mapping) -> None:
    """Write {name: (dtype, shape, raw little-endian bytes)} atomically (temp file + rename).

    By hand: the library's writer takes numpy arrays (no bfloat16) or, in its raw form, an API
    that changed between its releases.
    """
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, blob = tensors[name]
        size = memoryview(blob).nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(encoded).to_bytes(8, "little"))
            fh.write(encoded)
            for name in sorted(tensors):
                fh.write(tensors[name][2])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
