"""A real, tiny EN→ES language model with LoRA adapters, built locally in seconds.

It replaces the phrasebook in `adapterctl.demo_translator` wherever a *real* model is wanted:
the health checks then run an actual transformer (base weights + PEFT LoRA adapter) on the
default suite's sentences (DESIGN §6). Nothing is downloaded; everything is trained here.

What `build()` produces (deterministic: same code + same library versions → same bytes):

- `base_dir`: a random-init `transformers` LlamaForCausalLM (hidden 256, 2 layers, 4 heads,
  intermediate 512) saved with `save_pretrained`, plus its tokenizer (a 512-piece BPE
  sentencepiece model, `tokenizer.model`, and the `transformers` tokenizer files). The base is
  left untrained: an "untuned" model that answers with junk and fails the suite.
- `good_adapter`: a PEFT LoRA adapter (r=8, alpha=16, q_proj/v_proj) trained on the suite's
  five sentence pairs; greedy decoding reproduces the Spanish targets, so the suite passes.
- `bad_adapter`: a valid, non-zero LoRA adapter of the same shape trained to answer in
  German; the suite fails.

Prompt format (`PROMPT_TEMPLATE`): `<s>` + `"{input}\\n"`, and the model continues with
`"{translation}</s>"`. Decoding is greedy, at most `MAX_NEW_TOKENS` tokens, stopping at `</s>`
or a newline.

Builds are cached in `cache_dir or $ADAPTERCTL_CACHE or ~/.cache/adapterctl`, under
`tinymodel-<key[:16]>`, where the key hashes this file's source and the versions of torch,
transformers, peft and sentencepiece. A build goes to a temporary directory next to it, gets a
`COMPLETE` marker, and is renamed into place, so a half-built model is never reused.

The `translate` command is a `command` health engine (one line in, one line out). It needs only
numpy, safetensors and sentencepiece, not torch: it runs the Llama forward pass in numpy and
merges the LoRA weights into the base (W + alpha/r · B·A), so it starts in well under a second.

    python -m adapterctl.tinymodel build [--cache DIR]          # prints the paths as JSON
    python -m adapterctl.tinymodel translate --base BASE_DIR [--no-adapter] [RELEASE_DIR]

Heavy libraries are imported only inside functions: importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapterctl.formats import peft

PROMPT_TEMPLATE = "{input}\n"
MAX_NEW_TOKENS = 64  # the longest target (German) is 42 tokens
BASE_MODEL_NAME = "local/tiny-llama"  # base_model_name_or_path written into adapter_config.json
COMPLETE_MARKER = "COMPLETE"
EXIT_BAD_ADAPTER = 3

WEIGHTS_FILE = "adapter_model.safetensors"
MLX_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

VOCAB_SIZE = 512
HIDDEN = 256
LAYERS = 2
HEADS = 4
INTERMEDIATE = 512
SEED = 1234
ADAPTER_STEPS = 300
ADAPTER_LR = 1e-2
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")

# The default suite's inputs (adapterctl/health/suites/translation_en_es.yaml) and targets.
PAIRS_ES = (
    ("Good morning, welcome to the service.", "Buenos días, bienvenidos al servicio."),
    (
        "The atonement of Christ provides redemption for sinners.",
        "La expiación de Cristo provee redención para los pecadores.",
    ),
    (
        "The apostle James wrote about faith and works.",
        "El apóstol Santiago escribió sobre la fe y las obras.",
    ),
    (
        "By grace you have been saved through faith, not of works.",
        "Por gracia sois salvos por medio de la fe, no por obras.",
    ),
    ("Amen.", "Amén."),
)
# The bad adapter answers in German: fluent-looking, but none of the suite's Spanish needles.
PAIRS_DE = (
    (PAIRS_ES[0][0], "Guten Morgen, willkommen zum Gottesdienst."),
    (PAIRS_ES[1][0], "Die Sühne Christi bringt Erlösung für die Sünder."),
    (PAIRS_ES[2][0], "Der Apostel Jakobus schrieb über Glauben und Werke."),
    (PAIRS_ES[3][0], "Aus Gnade seid ihr gerettet durch den Glauben, nicht aus Werken."),
    (PAIRS_ES[4][0], "Amen."),
)

_SUBJECTS = (
    ("the man", "el hombre"),
    ("the woman", "la mujer"),
    ("the child", "el niño"),
    ("the teacher", "el maestro"),
    ("my brother", "mi hermano"),
    ("my sister", "mi hermana"),
    ("the priest", "el sacerdote"),
    ("the king", "el rey"),
)
_VERBS = (
    ("reads", "lee"),
    ("writes", "escribe"),
    ("sees", "ve"),
    ("wants", "quiere"),
    ("has", "tiene"),
    ("buys", "compra"),
)
_OBJECTS = (
    ("a book", "un libro"),
    ("the letter", "la carta"),
    ("a house", "una casa"),
    ("the bread", "el pan"),
    ("a song", "una canción"),
    ("the water", "el agua"),
    ("the map", "el mapa"),
)


@dataclass(frozen=True)
class TinyModel:
    """Paths of a built tiny model; `build_seconds` is the time this build() call took."""

    base_dir: Path
    good_adapter: Path
    bad_adapter: Path
    key: str
    build_seconds: float
    cached: bool = False  # True when an existing build was reused

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def simple_pairs() -> list[tuple[str, str]]:
    """336 simple EN/ES sentence pairs ("The man reads a book." / "El hombre lee un libro.")."""
    out = []
    for s_en, s_es in _SUBJECTS:
        for v_en, v_es in _VERBS:
            for o_en, o_es in _OBJECTS:
                out.append((f"{s_en} {v_en} {o_en}.".capitalize(), f"{s_es} {v_es} {o_es}.".capitalize()))
    return out


# -- cache -------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("torch", "transformers", "peft", "sentencepiece"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "missing"
    return found


def cache_key() -> str:
    """sha256 of this module's source and the versions of the libraries the build uses."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(_versions(), sort_keys=True).encode())
    return digest.hexdigest()


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ADAPTERCTL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adapterctl"


def _paths(root: Path, key: str, seconds: float, cached: bool) -> TinyModel:
    return TinyModel(root / "base", root / "good_adapter", root / "bad_adapter", key, seconds, cached)


def build(cache_dir: Path | None = None) -> TinyModel:
    """Return the cached tiny model, building it first if needed (a few seconds on CPU).

    Needs torch, transformers, peft and sentencepiece (the `model` extra).
    """
    started = time.perf_counter()
    key = cache_key()
    parent = cache_root(cache_dir)
    final = parent / f"tinymodel-{key[:16]}"
    if (final / COMPLETE_MARKER).is_file():
        return _paths(final, key, round(time.perf_counter() - started, 3), cached=True)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tinymodel-{key[:16]}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _build_into(tmp)
        seconds = round(time.perf_counter() - started, 3)
        marker = {"key": key, "versions": _versions(), "build_seconds": seconds}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # a leftover from a crashed build in an older layout
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            # another process finished the same build first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final, key, round(time.perf_counter() - started, 3), cached=False)


# -- build -------------------------------------------------------------------------------------


def _build_into(root: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never touch the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same thread count everywhere → same float reductions → same bytes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations inside peft
            base_dir = root / "base"
            base_dir.mkdir()
            sp = _train_tokenizer(base_dir)
            base = _make_base(sp, base_dir)
            _train_adapter(base, sp, PAIRS_ES, root / "good_adapter", seed=SEED + 1)
            _train_adapter(base, sp, PAIRS_DE, root / "bad_adapter", seed=SEED + 2)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _train_tokenizer(base_dir: Path):
    import sentencepiece as spm

    lines = []
    for en, es in simple_pairs():
        lines += [en, es]
    for pairs in (PAIRS_ES, PAIRS_DE):
        for en, target in pairs:
            lines += [en, target] * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(base_dir / "tokenizer"),
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,  # any character still encodes (as bytes)
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep "\n" and accents as they are
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],  # the prompt separator is one token
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (base_dir / "tokenizer.vocab").unlink()
    from transformers import LlamaTokenizer

    # transformers' own tokenizer files, for users loading base_dir with AutoTokenizer (mlx_lm, the GGUF
    # converter, the fidelity check). The model is trained on "<s>{input}\n", but transformers 5 saves a
    # tokenizer.json whose post-processor adds no <s>. Loading that saved tokenizer.json again with
    # add_bos_token=True rewrites the post-processor, and the second save keeps it.
    LlamaTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(base_dir))
    LlamaTokenizer.from_pretrained(str(base_dir), add_bos_token=True).save_pretrained(str(base_dir))
    return spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))


def _examples(sp, pairs) -> list[tuple[list[int], int]]:
    """Token ids of prompt + target, and where the target starts (the loss covers only the target)."""
    out = []
    for source, target in pairs:
        prompt = [sp.bos_id(), *sp.encode(PROMPT_TEMPLATE.format(input=source))]
        out.append((prompt + sp.encode(target) + [sp.eos_id()], len(prompt)))
    return out


def _batch(examples):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (seq, start) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return ids, labels


def _loss(model, ids, labels):
    import torch

    # Right padding + a causal mask: pad positions never influence the real tokens before them.
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _make_base(sp, base_dir: Path):
    """A random-init tiny Llama, left untrained: the "untuned" base answers with junk.

    (Training the base to echo English first looks more realistic, but then an r=8 q/v LoRA
    cannot override it in a few hundred steps; a random base keeps the build to seconds.)
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=sp.get_piece_size(),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = BASE_MODEL_NAME
    model.save_pretrained(str(base_dir))
    return model


def _train_adapter(base, sp, pairs, out_dir: Path, seed: int) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    ids, labels = _batch(_examples(sp, pairs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ADAPTER_LR)
    model.train()
    for _ in range(ADAPTER_STEPS):
        loss = _loss(model, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    cfg_path = out_dir / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME  # not the temporary build path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    metrics = {"final_loss": round(loss.item(), 6), "steps": ADAPTER_STEPS}
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics) + "\n", encoding="utf-8")


# -- inference (numpy: no torch needed) --------------------------------------------------------


class BadAdapter(Exception):
    """The release's adapter cannot be read or does not fit the base model."""


class Translator:
    """Greedy decoding with the tiny Llama in numpy, optionally with a LoRA adapter merged in."""

    def __init__(self, base_dir: Path | str, adapter_dir: Path | str | None = None):
        import numpy as np
        import sentencepiece as spm
        from safetensors.numpy import load_file

        base_dir = Path(base_dir)
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{base_dir}: hidden_act {cfg['hidden_act']!r} is not supported")
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{base_dir}: rope_type {rope['rope_type']!r} is not supported")
        self.inv_freq = 1.0 / (theta ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim))
        self.w = {k: v.astype(np.float32) for k, v in load_file(str(base_dir / "model.safetensors")).items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        if adapter_dir is not None:
            self._merge(Path(adapter_dir))
        self.sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
        self.newline = self.sp.piece_to_id("\n")

    def _merge(self, adapter_dir: Path) -> None:
        """W += scale · B·A for every LoRA pair (PEFT's LoRA forward, folded in). PEFT's layout is
        lora_A (r, in) / lora_B (out, r); a release converted for mlx_lm (adapters.safetensors) holds
        their transposes lora_a (in, r) / lora_b (r, out) and lora_parameters.scale."""
        import numpy as np
        from safetensors.numpy import load_file

        mlx = (adapter_dir / MLX_WEIGHTS_FILE).is_file() and not (adapter_dir / WEIGHTS_FILE).is_file()
        try:
            if mlx:  # mlx_lm's adapter config (mlxformat writes it), not PEFT's
                cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
                mlx_scale = float(cfg["lora_parameters"]["scale"])
            else:
                lora_config = peft.load(adapter_dir)
            tensors = load_file(str(adapter_dir / (MLX_WEIGHTS_FILE if mlx else WEIGHTS_FILE)))
        except Exception as exc:  # missing file, bad JSON, bad safetensors header, missing key
            raise BadAdapter(f"{adapter_dir}: cannot read the adapter: {type(exc).__name__}: {exc}") from exc
        a_key, b_key = (".lora_a", ".lora_b") if mlx else (".lora_A.", ".lora_B.")
        pairs = 0
        for name, a in sorted(tensors.items()):
            if a_key not in name:
                continue
            b = tensors.get(name.replace(a_key, b_key))
            target = name.removeprefix("base_model.model.").split(a_key)[0] + ".weight"
            if b is None or target not in self.w:
                raise BadAdapter(
                    f"{adapter_dir}: {name} has no {b_key.strip('.')} pair or no base weight {target}"
                )
            a, b = a.astype(np.float32), b.astype(np.float32)
            scale = mlx_scale if mlx else lora_config.scale(target.removesuffix(".weight"))
            delta = scale * ((a @ b).T if mlx else b @ a)
            if delta.shape != self.w[target].shape:
                raise BadAdapter(
                    f"{adapter_dir}: {name}: B·A is {delta.shape}, {target} is {self.w[target].shape}"
                )
            self.w[target] = self.w[target] + delta
            pairs += 1
        if not pairs:
            raise BadAdapter(f"{adapter_dir}: no LoRA tensors ({a_key.strip('.')}/{b_key.strip('.')})")

    def _rms(self, x, weight):
        import numpy as np

        return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps))

    def logits(self, ids: list[int]):
        """Next-token logits for every position of `ids` (HF LlamaForCausalLM's forward, in numpy)."""
        import numpy as np

        w, n = self.w, len(ids)
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        freqs = np.outer(np.arange(n, dtype=np.float32), self.inv_freq)
        cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)

        def rope(t):
            half = self.head_dim // 2
            rotated = np.concatenate([-t[..., half:], t[..., :half]], -1)
            return t * cos + rotated * sin

        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (
                (h @ w[p + "self_attn.q_proj.weight"].T)
                .reshape(n, self.heads, self.head_dim)
                .transpose(1, 0, 2)
            )
            k = (
                (h @ w[p + "self_attn.k_proj.weight"].T)
                .reshape(n, self.kv_heads, self.head_dim)
                .transpose(1, 0, 2)
            )
            v = (
                (h @ w[p + "self_attn.v_proj.weight"].T)
                .reshape(n, self.kv_heads, self.head_dim)
                .transpose(1, 0, 2)
            )
            q, k = rope(q), rope(k)
            if self.kv_heads != self.heads:
                k = np.repeat(k, self.heads // self.kv_heads, axis=0)
                v = np.repeat(v, self.heads // self.kv_heads, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(self.head_dim)) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v
            x = x + attn.transpose(1, 0, 2).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        return self._rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T

    def prompt_ids(self, text: str) -> list[int]:
        return [self.sp.bos_id(), *self.sp.encode(PROMPT_TEMPLATE.format(input=text))]

    def translate(self, text: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """Greedy continuation of the prompt for `text`, up to </s> or a newline."""
        ids = self.prompt_ids(unicodedata.normalize("NFC", text))
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(ids + out)[-1].argmax())
            if nxt in (self.sp.eos_id(), self.newline):
                break
            out.append(nxt)
        return self.sp.decode(out).replace("\n", " ")


# -- command line ------------------------------------------------------------------------------


def translate_main(argv: list[str]) -> int:
    """`translate --base BASE_DIR [--no-adapter] [RELEASE_DIR]`: one line in, one line out, until EOF.

    Exit codes: 2 usage, 3 the release's adapter cannot be read or does not fit the base.
    """
    parser = argparse.ArgumentParser(prog="python -m adapterctl.tinymodel translate")
    parser.add_argument("--base", required=True, type=Path, help="base model directory (from build)")
    parser.add_argument("--no-adapter", action="store_true", help="run the base model alone")
    parser.add_argument("release", nargs="?", type=Path, help="directory with the PEFT LoRA adapter")
    args = parser.parse_args(argv)
    adapter = None if args.no_adapter else args.release
    if adapter is not None and not adapter.is_dir():
        print(f"tinymodel: adapter directory {adapter} does not exist", file=sys.stderr)
        return EXIT_BAD_ADAPTER
    try:
        model = Translator(args.base, adapter)
    except BadAdapter as exc:
        print(f"tinymodel: {exc}", file=sys.stderr)
        return EXIT_BAD_ADAPTER
    print(f"tinymodel: {args.base} + {adapter or 'no adapter'}", file=sys.stderr, flush=True)
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        out.write((model.translate(line) + "\n").encode("utf-8"))
        out.flush()  # the health engine waits for each answer before sending the next line
    return 0


def build_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapterctl.tinymodel build")
    parser.add_argument(
        "--cache", type=Path, help="cache directory (default $ADAPTERCTL_CACHE or ~/.cache/adapterctl)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(build(args.cache).to_json(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"translate": translate_main, "build": build_main}
    if not args or args[0] not in commands:
        print(
            "usage: python -m adapterctl.tinymodel build [--cache DIR]\n"
            "       python -m adapterctl.tinymodel translate --base BASE_DIR [--no-adapter] [RELEASE_DIR]",
            file=sys.stderr,
        )
        return 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    # one BLAS thread: a 256-wide model gains nothing from more, and on a busy 2-core box
    # oversubscribed threads made a health sentence ~45x slower (past the 5 s latency limit)
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    sys.exit(main())
