"""Stand-in EN→ES "model" for `adapterctl demo` and the tests: a `command` health engine.

This is NOT a language model. It stands in for the real tiny model that a later release
brings, so the deploy pipeline (health checks, discriminator prompts, rollback) can be
exercised end to end with real adapter files and no GPU.

The rule, derived honestly from the adapter's weights:

- It loads `RELEASE_DIR/adapter_model.safetensors` and pairs every `...lora_A.weight` with
  its `...lora_B.weight`. An unreadable file, no pairs, an unpaired tensor or mismatched
  ranks → the reason on stderr, exit 3.
- If every lora_B tensor is all zeros, the adapter is a no-op (PEFT's initial state: the
  model is exactly the base model), so it behaves as the untuned base model and echoes
  each English input line unchanged.
- Otherwise it "translates" with a five-sentence built-in phrasebook (the default health
  suite's sentences; lookup ignores case and whitespace) and answers anything else with a
  clearly marked `[es] <input>`.

Usage: `python -m adapterctl.demo_translator RELEASE_DIR` — one UTF-8 line in on stdin, one
line out on stdout (flushed), until EOF.
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

WEIGHTS_FILE = "adapter_model.safetensors"
EXIT_BAD_ADAPTER = 3

PHRASEBOOK = {
    "Good morning, welcome to the service.": "Buenos días, bienvenidos al servicio.",
    "The atonement of Christ provides redemption for sinners.": (
        "La expiación de Cristo provee redención para los pecadores."
    ),
    "The apostle James wrote about faith and works.": "El apóstol Santiago escribió sobre la fe y las obras.",
    "By grace you have been saved through faith, not of works.": (
        "Por gracia sois salvos por medio de la fe, no por obras."
    ),
    "Amen.": "Amén.",
}


class BadAdapter(Exception):
    """The release's weights cannot be read or are not a LoRA adapter."""


def _key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


_LOOKUP = {_key(english): spanish for english, spanish in PHRASEBOOK.items()}


def adapter_is_noop(release_dir: str | Path) -> bool:
    """Return True if every lora_B tensor of the release's adapter is all zeros.

    Raises BadAdapter when the safetensors file is unreadable, has no lora_A/lora_B pair, has
    an unpaired tensor, or a pair whose ranks disagree (A is [r, in], B is [out, r]).
    """
    path = Path(release_dir) / WEIGHTS_FILE
    import numpy as np
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several unrelated types for a bad file
        raise BadAdapter(f"{path}: cannot read safetensors: {type(exc).__name__}: {exc}") from exc
    a_names = {name for name in tensors if ".lora_A." in name}
    b_names = {name for name in tensors if ".lora_B." in name}
    if not a_names:
        raise BadAdapter(f"{path}: no lora_A/lora_B tensors ({len(tensors)} tensors found)")
    unpaired = sorted(
        {a for a in a_names if a.replace(".lora_A.", ".lora_B.") not in b_names}
        | {b for b in b_names if b.replace(".lora_B.", ".lora_A.") not in a_names}
    )
    if unpaired:
        raise BadAdapter(
            f"{path}: {len(unpaired)} tensor(s) without their lora_A/lora_B pair, e.g. {unpaired[0]}"
        )
    for a_name in sorted(a_names):
        a, b = tensors[a_name], tensors[a_name.replace(".lora_A.", ".lora_B.")]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BadAdapter(f"{path}: {a_name} {a.shape} and its lora_B {b.shape} disagree on rank")
    return all(not np.any(tensors[name]) for name in b_names)


def translate(line: str, noop: bool) -> str:
    """Return the stand-in model's answer to one input line (without its newline)."""
    if noop or not line.strip():
        return line
    return _LOOKUP.get(_key(line), f"[es] {line}")


def main(argv: list[str] | None = None) -> int:
    """Serve lines from stdin to stdout until EOF; return the exit code (2 usage, 3 bad adapter)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m adapterctl.demo_translator RELEASE_DIR", file=sys.stderr)
        return 2
    try:
        noop = adapter_is_noop(args[0])
    except BadAdapter as exc:
        print(f"demo_translator: {exc}", file=sys.stderr)
        return EXIT_BAD_ADAPTER
    mode = "no-op adapter (all lora_B zero): echoing like the base model" if noop else "EN→ES phrasebook"
    print(f"demo_translator: {args[0]}: {mode}", file=sys.stderr, flush=True)
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        out.write((translate(line, noop) + "\n").encode("utf-8"))
        # The health engine waits for each answer before sending the next line.
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
