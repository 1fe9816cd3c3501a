"""llama.cpp's GGUF converter scripts on the training box: where they are and what they are.

scripts/build-llama-cpp-wheel extracts them (and their gguf-py) from the pinned llama-cpp-python
sdist; the gguf builders run them, and the conversion cache key includes their digest.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from adapterctl.convert.spec import ConversionError, dist_version
from adapterctl.tinymodel import cache_root

TOOLS_ENV = "ADAPTERCTL_LLAMA_CPP_TOOLS"
TOOLS_FIX = (
    "install the gguf extra: pip install -e '.[gguf]' and run scripts/build-llama-cpp-wheel, "
    "which extracts llama.cpp's converters from the pinned sdist"
)
CONVERT_HF = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
# what the converters import: gguf-py (PYTHONPATH) and, since llama.cpp split the script, conversion/
TOOL_FILES = (CONVERT_HF, CONVERT_LORA, "gguf-py/gguf/__init__.py", "conversion/__init__.py")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (not imported); ConversionError when absent."""
    version = dist_version("llama_cpp_python")
    if version is None:
        raise ConversionError("llama-cpp-python is not installed (it quantizes GGUFs)", TOOLS_FIX)
    return version


def tools_dir() -> Path:
    """llama.cpp's converter scripts: `$ADAPTERCTL_LLAMA_CPP_TOOLS`, else
    `{$ADAPTERCTL_CACHE or ~/.cache/adapterctl}/llama-cpp-tools-{llama-cpp-python version}`.

    Raises ConversionError (naming the path and the fix) when llama-cpp-python is not installed or
    the directory lacks a converter script or gguf-py."""
    version = llama_cpp_version()
    env = os.environ.get(TOOLS_ENV)
    path = Path(env) if env else cache_root() / f"llama-cpp-tools-{version}"
    missing = [name for name in TOOL_FILES if not (path / name).is_file()]
    if missing:
        where = f"${TOOLS_ENV}={path}" if env else str(path)
        raise ConversionError(
            f"llama.cpp's GGUF converters are missing: {where} has no {', '.join(missing)}",
            TOOLS_FIX + (f" (or unset {TOOLS_ENV})" if env else ""),
        )
    return path


@lru_cache(maxsize=8)
def _describe_tools(tools: Path, version: str) -> dict[str, str]:
    h = hashlib.sha256()
    files = [tools / CONVERT_HF, tools / CONVERT_LORA]
    files += sorted((tools / "conversion").rglob("*.py")) + sorted((tools / "gguf-py" / "gguf").rglob("*.py"))
    for f in files:
        h.update(f"{f.relative_to(tools).as_posix()}\0".encode())
        h.update(f.read_bytes())
    try:
        pyproject = (tools / "gguf-py" / "pyproject.toml").read_text(encoding="utf-8")
        gguf_py = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    except OSError:
        gguf_py = None
    return {
        "source": f"llama.cpp vendored in llama-cpp-python {version}",
        "gguf_py": gguf_py.group(1) if gguf_py else "unknown",
        "scripts_sha256": h.hexdigest()[:16],  # over the scripts' relative names and bytes
    }


def converter_info(tools: Path) -> dict[str, Any]:
    """What built the artifact, independent of where the tools are installed."""
    version = llama_cpp_version()
    return {"llama_cpp_python": version, "convert_hf_to_gguf": _describe_tools(tools, version)}
