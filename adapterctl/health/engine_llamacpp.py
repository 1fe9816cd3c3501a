"""`llamacpp` health engine: llama-cpp-python on a GGUF model, run on the endpoint (DESIGN §6).

Like the `command` engine, the model runs where it is served: `start()` spawns, through the
target's transport,

    python3 -m adapterctl.health.engine_llamacpp --gguf {release}/model.gguf
    python3 -m adapterctl.health.engine_llamacpp --base BASE.gguf --lora {release}/adapter.gguf

and talks to it one line in, one line out (the pipe handling is CommandEngine's). The program
loads the model with llama_cpp.Llama, answers an empty line with an empty line (a readiness
probe: `start()` sends one, so model load time is never charged to the first case's latency and a
missing or unloadable GGUF fails `start()` with its path and llama.cpp's stderr), and for every
other line prints the greedy completion (temperature 0, top_k 1) of `prompt_template` with the
line as `{input}`, cut at the first `stop` string.

Spec keys (`engine: llamacpp`): `gguf` (default `{release}/model.gguf`, a merged model shipped
in the release); or `lora` (a GGUF LoRA, e.g. `{release}/adapter.gguf`) with `base_gguf` (the
base model GGUF); `n_ctx` (512), `max_tokens` (64), `prompt_template` ("{input}\\n"), `stop`
(["\\n", "</s>"]), `timeout_s` (120: covers loading the model), `python` (the endpoint's
interpreter with adapterctl and llama-cpp-python installed, default `python3`), `env`.
Paths take the `command` engine's placeholders ({release}, {model}, {version}, {endpoint},
{adapter_dir}).

llama-cpp-python must be built with CMAKE_ARGS="-DGGML_NATIVE=OFF" (scripts/build-llama-cpp-wheel):
the default native build segfaults on quantized GGUFs on CPUs with AMX. The program warns on
stderr when it sees an AMX CPU and a llama.cpp compiled with AMX.

This module imports llama_cpp only inside `main()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapterctl.errors import ConfigError
from adapterctl.health.base import check_template
from adapterctl.health.command import ModelProcessEngine

MODULE = "adapterctl.health.engine_llamacpp"
DEFAULT_GGUF = "{release}/model.gguf"
DEFAULT_PROMPT_TEMPLATE = "{input}\n"
DEFAULT_STOP = ("\n", "</s>")
DEFAULT_N_CTX = 512
DEFAULT_MAX_TOKENS = 64
DEFAULT_TIMEOUT_S = 120.0
EXIT_NO_MODEL = 3  # the GGUF (or LoRA) file is missing or llama.cpp cannot load it
AMX_FIX = (
    "rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=OFF "
    "(scripts/build-llama-cpp-wheel builds, caches and installs such a wheel)"
)
SPEC_KEYS = (
    "engine",
    "gguf",
    "lora",
    "base_gguf",
    "n_ctx",
    "max_tokens",
    "prompt_template",
    "stop",
    "timeout_s",
    "python",
    "env",
)


def _positive_int(spec: Mapping, key: str, default: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"health {key} must be a positive integer, not {value!r}")
    return value


def _path_template(spec: Mapping, key: str, default: str | None = None) -> str | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"health {key} must be a non-empty path, not {value!r}", f"e.g. {key}: {DEFAULT_GGUF}"
        )
    check_template([value], what=f"health {key}")
    return value


def _escape(text: str) -> str:
    """`text` as a literal inside a CommandEngine argv template (no placeholders)."""
    return text.replace("{", "{{").replace("}", "}}")


_HINT = (
    "check the GGUF path and that the endpoint's python has adapterctl and llama-cpp-python "
    f"(built with CMAKE_ARGS=-DGGML_NATIVE=OFF) installed; run `python3 -m {MODULE} --gguf PATH` "
    "there and type a line"
)


class LlamaCppEngine(ModelProcessEngine):
    """Runs `python3 -m adapterctl.health.engine_llamacpp` on the endpoint; one line in, one line out."""

    name = "llamacpp"
    kind = "llamacpp"
    hint = _HINT

    def __init__(
        self,
        gguf: str | None = DEFAULT_GGUF,
        *,
        lora: str | None = None,
        base_gguf: str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        stop: Sequence[str] = DEFAULT_STOP,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        python: str = "python3",
        env: Mapping[str, str] | None = None,
    ):
        """Raises ConfigError for an invalid combination or value (see the module docstring)."""
        spec = {"n_ctx": n_ctx, "max_tokens": max_tokens}
        n_ctx = _positive_int(spec, "n_ctx", DEFAULT_N_CTX)
        max_tokens = _positive_int(spec, "max_tokens", DEFAULT_MAX_TOKENS)
        if lora is not None or base_gguf is not None:
            if lora is None or base_gguf is None:
                raise ConfigError(
                    "health engine 'llamacpp': `lora:` and `base_gguf:` go together",
                    "e.g. lora: {release}/adapter.gguf, base_gguf: /models/base.gguf",
                )
            lora = _path_template({"lora": lora}, "lora")
            base_gguf = _path_template({"base_gguf": base_gguf}, "base_gguf")
        else:
            gguf = _path_template({"gguf": gguf}, "gguf", DEFAULT_GGUF)
        if not isinstance(prompt_template, str) or "{input}" not in prompt_template:
            raise ConfigError(
                f"health prompt_template must be a string containing {{input}}, not {prompt_template!r}"
            )
        try:
            prompt_template.format(input="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"health prompt_template {prompt_template!r}: only {{input}} may be a placeholder ({exc})",
                "write literal braces as {{ and }}",
            ) from None
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"health stop must be a list of non-empty strings, not {stop!r}")
        if not isinstance(python, str) or not python:
            raise ConfigError(f"health python must be an interpreter name or path, not {python!r}")
        if not isinstance(env, Mapping | None) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in (env or {}).items()
        ):
            raise ConfigError("health env must map variable names to strings", "quote numbers: THREADS: '4'")
        self.gguf = None if lora else gguf
        self.lora = lora
        self.base_gguf = base_gguf
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.prompt_template = prompt_template
        self.stop = tuple(stop)
        argv = [python, "-m", MODULE]
        argv += ["--base", base_gguf, "--lora", lora] if lora else ["--gguf", gguf]
        argv += ["--n-ctx", str(n_ctx), "--max-tokens", str(max_tokens)]
        # JSON keeps newlines out of the command line (and out of error messages quoting it)
        if prompt_template != DEFAULT_PROMPT_TEMPLATE:
            argv += ["--prompt-template-json", _escape(json.dumps(prompt_template, ensure_ascii=False))]
        if self.stop != DEFAULT_STOP:
            argv += ["--stop-json", _escape(json.dumps(list(self.stop), ensure_ascii=False))]
        super().__init__(argv, timeout_s, env)

    def describe(self) -> str:
        if self.lora:
            return f"llamacpp: {self.base_gguf} + lora {self.lora}"
        return f"llamacpp: {self.gguf}"


def make(spec: Mapping) -> LlamaCppEngine:
    """Build the engine from a config's health section (keys whose value is None count as absent).

    Raises ConfigError for an invalid spec.
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("engine", "llamacpp") != "llamacpp":
        raise ConfigError(f"make() builds the llamacpp engine, not {spec['engine']!r}")
    if "lora" in spec and "gguf" in spec:
        raise ConfigError(
            "health engine 'llamacpp': give either `gguf:` (a merged model) "
            "or `lora:` + `base_gguf:`, not both"
        )
    kwargs = {k: spec[k] for k in SPEC_KEYS if k in spec and k != "engine"}
    return LlamaCppEngine(**kwargs)


# -- the program that runs on the endpoint --------------------------------------------------------


def amx_hazard(cpuinfo: str, system_info: str) -> bool:
    """True when the CPU has AMX and llama.cpp was compiled with it (a native build).

    Such builds segfault on quantized GGUFs; a -DGGML_NATIVE=OFF build reports no AMX.
    """
    cpu_amx = any(
        flag.startswith("amx")
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[-1].split()
    )
    compiled = system_info.replace(" ", "")
    return cpu_amx and any(f"{key}=1" in compiled for key in ("AMX_INT8", "AMX"))


def _system_info(llama_cpp) -> str:
    try:
        info = llama_cpp.llama_print_system_info()
    except Exception:  # an older or unusual build: no information, no warning
        return ""
    return info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)


def _warn_amx(llama_cpp) -> None:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return  # not Linux: no AMX hazard known
    if amx_hazard(cpuinfo, _system_info(llama_cpp)):
        print(
            "llamacpp: WARNING: this CPU has AMX and llama-cpp-python was compiled with AMX (a native "
            "build), which segfaults on quantized GGUFs. Fix: " + AMX_FIX,
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    """One line in, one line out until EOF. Exit codes: 2 usage, 3 model missing or unloadable."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--gguf", help="merged model GGUF")
    parser.add_argument("--base", help="base model GGUF (with --lora)")
    parser.add_argument("--lora", help="GGUF LoRA adapter applied to --base")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument(
        "--prompt-template-json",
        type=json.loads,
        help='the prompt as a JSON string with {input}; default "{input}\\n"',
    )
    parser.add_argument(
        "--stop-json",
        type=json.loads,
        help='stop strings as a JSON list; default ["\\n", "</s>"]',
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    args = parser.parse_args(argv)
    if bool(args.gguf) == bool(args.lora) or bool(args.lora) != bool(args.base):
        parser.error("give either --gguf MODEL or --base MODEL --lora ADAPTER")
    template = DEFAULT_PROMPT_TEMPLATE if args.prompt_template_json is None else args.prompt_template_json
    stop = list(DEFAULT_STOP) if args.stop_json is None else args.stop_json
    if not isinstance(template, str) or "{input}" not in template:
        parser.error("--prompt-template-json must be a JSON string containing {input}")
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        parser.error("--stop-json must be a JSON list of non-empty strings")
    model_path = args.gguf or args.base
    for what, path in (("model GGUF", model_path), ("LoRA GGUF", args.lora)):
        if path and not os.path.isfile(path):
            print(f"llamacpp: {what} {path} does not exist", file=sys.stderr, flush=True)
            return EXIT_NO_MODEL

    import llama_cpp

    _warn_amx(llama_cpp)
    try:
        llm = llama_cpp.Llama(
            model_path=model_path,
            lora_path=args.lora,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            seed=0,
            verbose=False,
        )
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError for unloadable files
        what = f"{model_path} + {args.lora}" if args.lora else model_path
        print(f"llamacpp: cannot load {what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NO_MODEL
    print(
        f"llamacpp: loaded {model_path}{' + ' + args.lora if args.lora else ''} "
        f"(llama-cpp-python {getattr(llama_cpp, '__version__', '?')})",
        file=sys.stderr,
        flush=True,
    )
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        answer = ""
        if line:
            result = llm.create_completion(
                template.format(input=line),
                max_tokens=args.max_tokens,
                temperature=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
                stop=stop,
            )
            answer = result["choices"][0]["text"]
        out.write((" ".join(answer.splitlines()).strip() + "\n").encode("utf-8"))
        out.flush()  # the health engine waits for each answer before sending the next line
    return 0


if __name__ == "__main__":
    sys.exit(main())
