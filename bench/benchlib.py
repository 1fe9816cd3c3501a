"""What the bench scripts share: the repo root on sys.path and the real sshd test hosts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_sshhosts():
    """tests/sshhosts.py as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("sshhosts", ROOT / "tests" / "sshhosts.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sshhosts"] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod
