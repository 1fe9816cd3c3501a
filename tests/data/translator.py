"""A stand-in translator for health tests: reads one English line, prints one Spanish line.

Usage: translator.py MODE [ARGS...]. Modes change one behaviour so each test can exercise one
failure of a real program (wrong answer, slow, crash, hang, bad bytes).
"""

import json
import os
import sys
import time
import unicodedata

GOOD = {
    "Good morning, welcome to the service.": "Buenos días, bienvenidos al servicio.",
    # NFD on purpose: the matcher must normalize before comparing.
    "The atonement of Christ provides redemption for sinners.": unicodedata.normalize(
        "NFD", "La expiación de Cristo provee redención para los pecadores."
    ),
    "The apostle James wrote about faith and works.": "EL APÓSTOL SANTIAGO ESCRIBIÓ SOBRE LA FE Y LAS OBRAS.",
    "By grace you have been saved through faith, not of works.": (
        "Por gracia sois salvos por medio de la fe, no por obras."
    ),
    "Amen.": "Amén.",
}


def answer(mode: str, text: str, count: int) -> str | bytes | None:
    if mode == "args":
        env = {k: v for k, v in os.environ.items() if k.startswith("ADAPTERCTL_")}
        return json.dumps({"argv": sys.argv[2:], "env": env}, ensure_ascii=False)
    if mode == "echo":
        return text
    if mode == "wrong" and "James" in text:
        return "El apóstol James escribió sobre la fe y las obras."
    if mode == "cafe" and "grace" in text:
        return "Por gracia, un café."
    if mode == "slow" and text == sys.argv[2]:
        time.sleep(float(sys.argv[3]))
    if mode == "crash" and count == 3:
        print("loading adapter...", file=sys.stderr)
        print("RuntimeError: adapter weights are corrupt", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang" and count == 2:
        time.sleep(60)
    if mode == "binary":
        return b"\xff\xfe caf\xe9\n"
    return GOOD.get(text, "¿?")


def main() -> None:
    mode = sys.argv[1]
    if os.environ.get("PIDFILE"):
        with open(os.environ["PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    count = 0
    while line := sys.stdin.buffer.readline():
        count += 1
        out = answer(mode, line.decode("utf-8").rstrip("\n"), count)
        sys.stdout.buffer.write(out if isinstance(out, bytes) else out.encode("utf-8") + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
