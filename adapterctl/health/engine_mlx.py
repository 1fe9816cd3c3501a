"""`mlx` health engine: mlx_lm with the base model + the release's LoRA adapter, on the endpoint.

Like the `command` engine, the model runs where it is served: `start()` spawns, through the
target's transport,

    python3 -m adapterctl.health.engine_mlx --base BASE_DIR --adapter {release}

and talks to it one line in, one line out (the pipe handling is CommandEngine's). The program
loads `mlx_lm.load(BASE_DIR, adapter_path=ADAPTER)` once, answers an empty line with an empty line
(a readiness probe: `start()` sends one, so model load time is never charged to the first case's
latency, and an unloadable base or adapter fails `start()` with mlx_lm's error on stderr), and for
every other line prints the greedy continuation (temperature 0) of `prompt_template` with the
line (NFC-normalized) as `{input}`, stopping at an end-of-sequence token, at a newline, or after
`max_tokens` tokens.

The adapter directory is in mlx_lm's format (`adapters.safetensors` + `adapter_config.json` with
`fine_tune_type: lora`), not PEFT's: `adapterctl.mlxformat.peft_to_mlx` converts one.

The prompt is tokenized by the base model's own tokenizer files, special tokens included: a
Llama tokenizer must add `<s>` itself (its tokenizer.json post-processor), as the prompt template
has no `<s>`.

Spec keys (`engine: mlx`): `base` (required: the base model directory on the endpoint),
`adapter` (default `{release}`), `max_tokens` (64), `prompt_template` ("{input}\\n"),
`timeout_s` (120: also covers loading the model), `python` (the endpoint's interpreter with
adapterctl and mlx-lm installed, default `python3`), `env`. Paths take the `command` engine's
placeholders ({release}, {model}, {version}, {endpoint}, {adapter_dir}).

This module imports mlx and mlx_lm only inside `main()`.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections.abc import Mapping

from adapterctl.errors import ConfigError
from adapterctl.health.base import check_template
from adapterctl.health.command import ModelProcessEngine

MODULE = "adapterctl.health.engine_mlx"
DEFAULT_ADAPTER = "{release}"
DEFAULT_PROMPT_TEMPLATE = "{input}\n"
DEFAULT_MAX_TOKENS = 64
DEFAULT_TIMEOUT_S = 120.0
EXIT_NO_MODEL = 3  # the base or adapter directory is missing or mlx_lm cannot load it
EXIT_NO_MLX = 4  # mlx / mlx_lm cannot be imported by this interpreter
SPEC_KEYS = ("engine", "base", "adapter", "max_tokens", "prompt_template", "timeout_s", "python", "env")


def _escape(text: str) -> str:
    """`text` as a literal inside a CommandEngine argv template (no placeholders)."""
    return text.replace("{", "{{").replace("}", "}}")


def _path(value: object, key: str, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"health {key} must be a non-empty path, not {value!r}", f"e.g. {key}: {example}")
    check_template([value], what=f"health {key}")
    return value


_HINT = (
    "check the base and adapter paths (the adapter must be in mlx_lm's format: adapters.safetensors + "
    "adapter_config.json) and that the endpoint's python has adapterctl and mlx-lm installed; run "
    f"`python3 -m {MODULE} --base BASE --adapter ADAPTER` there and type a line"
)


class MlxEngine(ModelProcessEngine):
    """Runs `python3 -m adapterctl.health.engine_mlx` on the endpoint; one line in, one line out."""

    name = "mlx"
    kind = "mlx"
    hint = _HINT

    def __init__(
        self,
        base: str,
        adapter: str | None = DEFAULT_ADAPTER,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        python: str = "python3",
        env: Mapping[str, str] | None = None,
    ):
        """`adapter=None` runs the base model alone. Raises ConfigError for an invalid value."""
        base = _path(base, "base", "/models/llama-3.2-1b-instruct")
        if adapter is not None:
            adapter = _path(adapter, "adapter", DEFAULT_ADAPTER)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ConfigError(f"health max_tokens must be a positive integer, not {max_tokens!r}")
        if not isinstance(prompt_template, str) or "{input}" not in prompt_template:
            raise ConfigError(
                f"health prompt_template must be a string containing {{input}}, not {prompt_template!r}"
            )
        if not isinstance(python, str) or not python:
            raise ConfigError(f"health python must be an interpreter name or path, not {python!r}")
        if not isinstance(env, Mapping | None) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in (env or {}).items()
        ):
            raise ConfigError("health env must map variable names to strings", "quote numbers: THREADS: '4'")
        self.base = base
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.prompt_template = prompt_template
        argv = [python, "-m", MODULE, "--base", base]
        argv += ["--adapter", adapter] if adapter is not None else ["--no-adapter"]
        argv += ["--max-tokens", str(max_tokens)]
        if prompt_template != DEFAULT_PROMPT_TEMPLATE:  # the default keeps the command on one line
            argv += ["--prompt-template", _escape(prompt_template)]
        super().__init__(argv, timeout_s, env)

    def describe(self) -> str:
        return f"mlx: {self.base} + {self.adapter if self.adapter is not None else 'no adapter'}"


def make(spec: Mapping) -> MlxEngine:
    """Build the engine from a config's health section (keys whose value is None count as absent).

    Raises ConfigError for an invalid spec.
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("engine", "mlx") != "mlx":
        raise ConfigError(f"make() builds the mlx engine, not {spec['engine']!r}")
    if "base" not in spec:
        raise ConfigError(
            "health engine 'mlx' needs `base:`, the base model directory on the endpoint",
            "e.g. base: /models/llama-3.2-1b-instruct (adapter defaults to {release})",
        )
    kwargs = {k: spec[k] for k in SPEC_KEYS if k in spec and k != "engine"}
    if kwargs.get("adapter") == "none":  # the base (or a fused model) alone
        kwargs["adapter"] = None
    return MlxEngine(**kwargs)


# -- the program that runs on the endpoint --------------------------------------------------------


class Generator:
    """Greedy decoding with a loaded mlx_lm model: the engine program's (and the tests') one path."""

    def __init__(
        self,
        model,
        tokenizer,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.prompt_template = prompt_template
        self.eos = set(tokenizer.eos_token_ids or ())

    def prompt_ids(self, text: str) -> list[int]:
        prompt = self.prompt_template.replace("{input}", unicodedata.normalize("NFC", text))
        return list(self.tokenizer.encode(prompt))

    def tokens(self, text: str) -> list[int]:
        """The greedy continuation's token ids: up to an end-of-sequence token (excluded), the first
        token whose text holds a newline (included), or max_tokens."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        out: list[int] = []
        steps = generate_step(
            mx.array(self.prompt_ids(text)),
            self.model,
            max_tokens=self.max_tokens,
            sampler=make_sampler(temp=0.0),  # argmax
        )
        for token, _ in steps:
            token = int(token)
            if token in self.eos:
                break
            out.append(token)
            if "\n" in self.tokenizer.decode([token]):
                break
        return out

    def __call__(self, text: str) -> str:
        """The greedy continuation's text, cut at the first newline."""
        return self.tokenizer.decode(self.tokens(text)).split("\n", 1)[0]


def main(argv: list[str] | None = None) -> int:
    """One line in, one line out until EOF. Exit codes: 2 usage, 3 model unloadable, 4 no mlx_lm."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--base", required=True, help="base model directory (Hugging Face layout)")
    parser.add_argument("--adapter", help="mlx_lm adapter directory (adapters.safetensors)")
    parser.add_argument("--no-adapter", action="store_true", help="run the base model alone")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    args = parser.parse_args(argv)
    if bool(args.adapter) == args.no_adapter:
        parser.error("give either --adapter DIR or --no-adapter")
    for what, path in (("base model directory", args.base), ("adapter directory", args.adapter)):
        if path and not os.path.isdir(path):
            print(f"mlx: {what} {path} does not exist", file=sys.stderr, flush=True)
            return EXIT_NO_MODEL
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapters.safetensors")):
        peft = os.path.isfile(os.path.join(args.adapter, "adapter_model.safetensors"))
        print(
            f"mlx: adapter directory {args.adapter} has no adapters.safetensors"
            + (
                " (it holds a PEFT adapter: convert it for mlx_lm with adapterctl.mlxformat.peft_to_mlx)"
                if peft
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NO_MODEL
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:  # plain `mlx` on Linux: libmlx.so is in the mlx[cpu] extra
        print(
            f"mlx: {sys.executable} cannot import mlx_lm: {exc} "
            '(install with: pip install "mlx[cpu]" mlx-lm on Linux, pip install mlx-lm on macOS)',
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NO_MLX
    try:
        model, tokenizer = mlx_lm.load(args.base, adapter_path=args.adapter)
    except Exception as exc:  # mlx_lm raises FileNotFoundError/ValueError/KeyError for unloadable dirs
        what = f"{args.base} + {args.adapter}" if args.adapter else args.base
        print(f"mlx: cannot load {what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NO_MODEL
    generate = Generator(model, tokenizer, args.max_tokens, args.prompt_template)
    print(
        f"mlx: loaded {args.base} + {args.adapter or 'no adapter'} "
        f"(mlx {mx.__version__}, mlx_lm {mlx_lm.__version__}, {mx.default_device()})",
        file=sys.stderr,
        flush=True,
    )
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        answer = generate(line) if line else ""
        out.write((" ".join(answer.splitlines()) + "\n").encode("utf-8"))
        out.flush()  # the health engine waits for each answer before sending the next line
    return 0


if __name__ == "__main__":
    sys.exit(main())
