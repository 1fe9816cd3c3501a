"""How long `adapterctl --help` and `adapterctl status` take to start, against bare Python.

Prints the median wall time of N runs of each, the ratio to `python -c pass`, and which
heavy modules (torch, peft, transformers, mlx, llama_cpp) each command imported — none is the
goal. Target: `adapterctl --help` under 0.3 s. Run: python bench/import_time.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "peft", "transformers", "mlx", "mlx_lm", "llama_cpp")
PROBE = """
import sys
sys.argv = ["adapterctl", *{args!r}]
from adapterctl.cli import main
try:
    main()
except SystemExit:
    pass
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def timed(argv: list[str], env: dict[str, str], n: int) -> float:
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def heavy_imports(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")), "HEAVY=?")
    return line[6:] or "none"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with tempfile.TemporaryDirectory() as tmp:
        # a minimal config with one local endpoint so `status` has something to read
        cfg = Path(tmp) / "adapterctl.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "endpoints": {
                        "local-a": {
                            "host": "local",
                            "adapter_dir": "./ep",
                            "kind": "mlx",
                            "reload_method": "none",
                        }
                    },
                    "models": {},
                }
            )
        )
        env = dict(os.environ, ADAPTERCTL_CONFIG=str(cfg))
        base = timed([sys.executable, "-c", "pass"], env, n)
        print(f"baseline  python -c pass          {base * 1000:7.1f} ms")
        for args in (["--help"], ["status"]):
            t = timed([sys.executable, "-m", "adapterctl", *args], env, n)
            print(
                f"adapterctl {' '.join(args):<22} {t * 1000:7.1f} ms  ratio {t / base:5.2f}x  "
                f"heavy imports: {heavy_imports(args, env)}"
            )


if __name__ == "__main__":
    main()
