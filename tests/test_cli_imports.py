"""`adapterctl --help` and `status` must not import the heavy ML stacks (they are lazy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.heavy  # runs Python subprocesses that import the CLI

HEAVY = ("torch", "peft", "transformers", "mlx", "mlx_lm", "llama_cpp")
PROBE = """
import sys
sys.argv = ["adapterctl", *{args!r}]
from adapterctl.cli import main
try:
    main()
except SystemExit:
    pass
print("LOADED=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})), file=sys.stderr)
"""


def _loaded(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED=")]
    assert line, proc.stderr
    return line[0][len("LOADED=") :]


def test_help_imports_no_heavy_ml_module():
    assert _loaded(["--help"]) == ""


def test_status_imports_no_heavy_ml_module(workspace):
    import os

    workspace.cli("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "rtx-1", check=0)
    env = dict(os.environ, ADAPTERCTL_CONFIG=str(workspace.config))
    assert _loaded(["status"], env) == ""
