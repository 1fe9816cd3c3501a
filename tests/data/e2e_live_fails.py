"""Health command for the e2e tests: right answers for a staged release, wrong ones once it is live.

Usage: e2e_live_fails.py RELEASE_PATH. For `.../releases/<id>` it is the stand-in translator
(adapterctl.demo_translator); for a path ending in `/active` it echoes the English input, as the
base model would, so the post-activation check fails while the pre-activation one passes.
"""

import sys

from adapterctl.demo_translator import main


def echo() -> int:
    for raw in sys.stdin.buffer:
        sys.stdout.buffer.write(raw.rstrip(b"\r\n") + b"\n")
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    release = sys.argv[1] if len(sys.argv) == 2 else ""
    sys.exit(echo() if release.rstrip("/").endswith("/active") else main(sys.argv[1:]))
