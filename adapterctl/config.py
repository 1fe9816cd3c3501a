"""adapterctl.yaml: find it, parse it with line numbers, validate it into frozen values.

Every problem is one ConfigError line "{file}:{line}: {key.path}: {problem}". We walk yaml's
node graph ourselves (not safe_load) because only nodes carry line numbers and show duplicate keys.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from adapterctl.errors import ConfigError, UsageError
from adapterctl.names import check_name

CONFIG_NAME = "adapterctl.yaml"
ENV_VAR = "ADAPTERCTL_CONFIG"
LOCAL_HOST = "local"
KINDS = ("mlx", "gguf")
RELOAD_METHODS = ("sigusr1", "restart", "none")
HEALTH_ENGINES = ("command", "http", "mlx", "llamacpp", "auto")  # DESIGN §6; auto: mlx or llamacpp by kind
HTTP_MODES = ("openai", "json")
DEFAULT_STORE = "adapters"
DEFAULT_KEEP_RELEASES = 5
DEFAULT_LOCK_STALE_S = 3600.0

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _NULL, _MERGE, _BOOL = (_T + t for t in ("str", "int", "float", "null", "merge", "bool"))
_KINDS_OF_SCALAR = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "timestamp": "a date",
}


@dataclass(frozen=True)
class HealthSpec:
    """How a model's releases are health-checked (DESIGN §6); `suite` is a builtin name, a path or none."""

    suite: str = "translation_en_es"
    engine: str = "command"
    command: tuple[str, ...] | None = None
    timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict, hash=False)
    # engine: http (DESIGN §6): POST each input to the live service
    url: str | None = None
    mode: str = "openai"  # openai | json
    model: str | None = None  # name sent in the OpenAI request; None = the adapterctl model name
    request_template: dict[str, Any] | None = field(default=None, hash=False)  # json mode
    response_path: str | None = None  # json mode: dotted path to the answer
    headers: dict[str, str] = field(default_factory=dict, hash=False)
    # identity, not liveness (DESIGN §5): at verify, the live answer to `discriminator` must differ
    # from the base model's, which `base_command` (a command engine without the adapter) gives
    discriminator: str | None = None
    base_command: tuple[str, ...] | None = None
    # engine: mlx (mlx_lm on the endpoint) / llamacpp (llama-cpp-python on the endpoint)
    base: str | None = None  # mlx: base model dir
    adapter: str | None = None  # mlx: MLX-format adapter dir (default {release})
    gguf: str | None = None  # llamacpp: merged model GGUF (default {release}/model.gguf)
    lora: str | None = None  # llamacpp: GGUF LoRA, with base_gguf
    base_gguf: str | None = None
    n_ctx: int | None = None
    stop: tuple[str, ...] | None = None
    max_tokens: int | None = None  # mlx, llamacpp
    prompt_template: str | None = None  # mlx, llamacpp: "{input}\n" by default
    python: str | None = None  # mlx, llamacpp: the endpoint's interpreter with the engine installed


@dataclass(frozen=True)
class ConvertSetting:
    """A `convert:` entry (DESIGN §5, phase 2); unset fields fall back to the next level."""

    format: str | None = None  # mlx: adapter | fused | peft; gguf: merged | lora | peft
    quant: str | None = None  # gguf merged: a llama.cpp file type (default Q4_K_M)
    fidelity: bool | None = None  # compare with the PEFT original on the health suite (default true)


@dataclass(frozen=True)
class BaseGguf:
    """The base GGUF a `gguf` endpoint keeps (for GGUF LoRA releases): path there and its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: Path  # absolute, on the training box
    base_model: str | None
    health: HealthSpec | None  # None when the config has no `health` key
    base_dir: Path | None = None  # the base model (Hugging Face layout) on the training box
    convert: dict[str, ConvertSetting] = field(default_factory=dict, hash=False)  # kind -> setting


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    host: str  # ssh alias/hostname, or "local" for a directory on this machine
    adapter_dir: str  # absolute on the endpoint
    kind: str
    reload_method: str
    user: str | None = None
    port: int | None = None
    pidfile: str | None = None  # absolute on the endpoint
    unit: str | None = None
    reload_timeout_s: float = 10.0
    allow_outage: bool = False  # reload_method restart may stop the service without --allow-outage
    models: tuple[str, ...] | None = None  # None = serves every model
    compat_links: dict[str, str] = field(
        default_factory=dict, hash=False
    )  # path under adapter_dir's parent -> model
    convert: ConvertSetting | None = None  # overrides the models' setting for this endpoint's kind
    base_gguf: BaseGguf | None = None

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL_HOST

    def serves(self, model: str) -> bool:
        """Whether this endpoint serves `model` (all models when `models` is not configured)."""
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Config:
    path: Path
    store: Path
    keep_releases: int
    lock_stale_after_s: float
    endpoints: dict[str, EndpointConfig] = field(hash=False)
    models: dict[str, ModelConfig] = field(hash=False)

    def endpoint(self, name: str) -> EndpointConfig:
        """The endpoint called `name`; raises UsageError naming it and listing the known endpoints."""
        return _lookup("endpoint", name, self.endpoints, self.path)

    def model(self, name: str) -> ModelConfig:
        """The model called `name`; raises UsageError naming it and listing the known models."""
        return _lookup("model", name, self.models, self.path)


def find_config(explicit: str | None, env: Mapping[str, str], cwd: Path, home: Path) -> Path:
    """Locate adapterctl.yaml: `explicit` (--config), $ADAPTERCTL_CONFIG, cwd and its parents, then
    home/.config/adapterctl/. Raises ConfigError for a missing explicit/env path or when nothing is found."""
    cwd = Path(os.path.abspath(cwd))
    for value, origin in ((explicit, "--config"), (env.get(ENV_VAR), f"${ENV_VAR}")):
        if value is not None and not value.strip():  # never a silent fallback to another config
            raise ConfigError(
                f"{origin} is empty: no config file given",
                f"give the path of an adapterctl.yaml{' or unset it' if origin != '--config' else ''}",
            )
        if value:
            path = cwd / Path(value).expanduser()
            if not path.is_file():
                problem = "is a directory, not a file" if path.is_dir() else "does not exist"
                raise ConfigError(f"{path} (given by {origin}) {problem}", f"fix or drop {origin}")
            return path
    searched = [d / CONFIG_NAME for d in (cwd, *cwd.parents)] + [
        home / ".config" / "adapterctl" / CONFIG_NAME
    ]
    for path in searched:
        if path.is_file():
            return path
    raise ConfigError(
        f"no {CONFIG_NAME} found; searched: {', '.join(map(str, searched))}",
        "run `adapterctl demo` to write an example, or start from manifests/adapterctl.example.yaml "
        f"(pass it with --config or ${ENV_VAR})",
    )


def load_config(path: Path) -> Config:
    """Read and validate the config at `path`; relative paths in it are taken from its directory.

    Raises ConfigError "{file}:{line}: {key.path}: {problem}" for unreadable or malformed YAML and for
    every schema, type, name and cross-reference problem. Nothing outside the file is read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as e:  # control characters: yaml gives a position, not a line
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(
            f"{path}:{line}: invalid YAML: unacceptable character #x{e.character:04x}"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" ({e.context} on line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ConfigError(f"{path}:{mark.line + 1}: invalid YAML: {e.problem}{where}") from None
    if root is None:
        raise ConfigError(
            f"{path}:1: (top level): the file is empty", "see manifests/adapterctl.example.yaml"
        )

    r = _Reader(path)
    top, _ = r.fields(root, "", _TOP)
    models = top.get("models", {})
    for name, node, ref_path in r.model_refs:
        if name not in models:
            raise r.error(
                node, ref_path, f"unknown model {name!r}{_suggest(name, models)}", _known("models", models)
            )
    return Config(
        path=Path(os.path.abspath(path)),
        store=r.local_path(top.get("store", DEFAULT_STORE)),
        keep_releases=top.get("keep_releases", DEFAULT_KEEP_RELEASES),
        lock_stale_after_s=top.get("lock_stale_after_s", DEFAULT_LOCK_STALE_S),
        endpoints=top.get("endpoints", {}),
        models=models,
    )


# --- the schema walker -----------------------------------------------------------------------

Converter = Callable[["_Reader", Node, str], Any]
Schema = dict[str, tuple[Converter, bool]]  # key -> (converter, required)


class _Reader:
    """Walks one file's nodes; knows the file (for messages) and its directory (for relative paths)."""

    def __init__(self, file: Path):
        self.file = file
        self.base = Path(os.path.abspath(file)).parent
        self.yaml = yaml.SafeLoader("")  # only its constructor is used, to convert scalars as yaml would
        self.model_refs: list[tuple[str, Node, str]] = []  # checked once every model is known

    def error(self, where: Node | Mark, path: str, problem: str, hint: str | None = None) -> ConfigError:
        mark = getattr(where, "start_mark", where)
        return ConfigError(f"{self.file}:{mark.line + 1}: {path or '(top level)'}: {problem}", hint)

    def local_path(self, value: str) -> Path:
        """A path on this machine: `~` expanded, relative ones taken from the config's directory."""
        return self.base / Path(value).expanduser()

    def pairs(self, node: Node, path: str) -> dict[str, tuple[Node, Node]]:
        """A mapping's entries as key -> (key node, value node); rejects duplicates, applies `<<` merges."""
        if not isinstance(node, MappingNode):
            raise self.error(node, path, f"expected a mapping, got {_describe(node)}")
        seen: dict[str, Node] = {}
        for key, _ in node.value:
            if key.tag == _MERGE:
                continue
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                raise self.error(key, path, f"keys must be strings, got {_describe(key)}")
            if key.value in seen:
                first = seen[key.value].start_mark.line + 1
                raise self.error(
                    key, _join(path, key.value), f"duplicate key (first defined on line {first})"
                )
            seen[key.value] = key
        try:
            self.yaml.flatten_mapping(node)  # merged entries come first, so the mapping's own keys win
        except yaml.MarkedYAMLError as e:
            raise self.error(e.problem_mark, path, e.problem) from None
        return {key.value: (key, value) for key, value in node.value}

    def fields(self, node: Node, path: str, schema: Schema, at: Node | None = None):
        """Convert a mapping by `schema`; return (values, value nodes). Absent or null optional keys are
        left out so callers apply defaults; `at` is where a missing required key is reported."""
        entries = self.pairs(node, path)
        for key, (key_node, _) in entries.items():
            if key not in schema:
                raise self.error(
                    key_node,
                    _join(path, key),
                    f"unknown key {key!r}{_suggest(key, schema)}",
                    _known("keys", schema),
                )
        values: dict[str, Any] = {}
        nodes: dict[str, Node] = {}
        for key, (convert, required) in schema.items():
            key_node, value_node = entries.get(key, (None, None))
            if value_node is None or value_node.tag == _NULL:
                if required:
                    problem = "required key is missing" if key_node is None else "required key has no value"
                    raise self.error(key_node or at or node, _join(path, key), problem)
                continue
            values[key] = convert(self, value_node, _join(path, key))
            nodes[key] = value_node
        return values, nodes


def _scalar(r: _Reader, node: Node, path: str, tags: Iterable[str], expected: str, hint: str | None = None):
    if not (isinstance(node, ScalarNode) and node.tag in tags):
        raise r.error(node, path, f"expected {expected}, got {_describe(node)}", hint)
    return r.yaml.construct_object(node)


def _text(r: _Reader, node: Node, path: str) -> str:
    return _scalar(r, node, path, {_STR}, "a string", "quote it if you mean the text")


def _str(r: _Reader, node: Node, path: str) -> str:
    value = _text(r, node, path)
    if not value.strip():
        raise r.error(node, path, "must not be empty")
    return value


def _token(r: _Reader, node: Node, path: str) -> str:
    """Host, user and unit end up in ssh/systemctl argv: no leading '-' (an option), no whitespace."""
    value = _str(r, node, path)
    if value.startswith("-") or any(c.isspace() for c in value):
        raise r.error(node, path, f"{value!r} must not start with '-' or contain whitespace")
    return value


def _int(low: int, high: int | None = None) -> Converter:
    def convert(r: _Reader, node: Node, path: str) -> int:
        value = _scalar(r, node, path, {_INT}, "an integer")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise r.error(node, path, f"must be {bounds} (got {value})")
        return value

    return convert


def _seconds(r: _Reader, node: Node, path: str) -> float:
    value = float(_scalar(r, node, path, {_INT, _FLOAT}, "a number of seconds"))
    if not (math.isfinite(value) and value > 0):
        raise r.error(node, path, f"must be a positive number of seconds (got {node.value})")
    return value


def _bool(r: _Reader, node: Node, path: str) -> bool:
    return _scalar(r, node, path, {_BOOL}, "true or false")


def _enum(*choices: str) -> Converter:
    def convert(r: _Reader, node: Node, path: str) -> str:
        value = _scalar(r, node, path, {_STR}, f"one of {'/'.join(choices)}")
        if value not in choices:
            problem = (
                f"invalid value {value!r}; expected one of: {', '.join(choices)}{_suggest(value, choices)}"
            )
            raise r.error(node, path, problem)
        return value

    return convert


def _str_list(r: _Reader, node: Node, path: str) -> tuple[str, ...]:
    if not isinstance(node, SequenceNode):
        raise r.error(node, path, f"expected a list, got {_describe(node)}")
    return tuple(_str(r, item, f"{path}[{i}]") for i, item in enumerate(node.value))


def _command(r: _Reader, node: Node, path: str) -> tuple[str, ...]:
    argv = _str_list(r, node, path)
    if not argv:
        raise r.error(node, path, "must be a non-empty list of strings (the program and its arguments)")
    return argv


def _str_map(r: _Reader, node: Node, path: str) -> dict[str, str]:
    return {k: _text(r, v, _join(path, k)) for k, (_, v) in r.pairs(node, path).items()}


def _model_ref(r: _Reader, node: Node, path: str) -> str:
    try:
        name = check_name("model", _str(r, node, path))
    except UsageError as e:
        raise r.error(node, path, e.message, e.hint) from None
    r.model_refs.append((name, node, path))
    return name


def _model_list(r: _Reader, node: Node, path: str) -> tuple[str, ...]:
    _str_list(r, node, path)  # type-check the whole list first
    return tuple(_model_ref(r, item, f"{path}[{i}]") for i, item in enumerate(node.value))


def _compat_links(r: _Reader, node: Node, path: str) -> dict[str, str]:
    links = {}
    for link, (key_node, value_node) in r.pairs(node, path).items():
        parts = PurePosixPath(link).parts
        if not parts or link.startswith(("/", "~")) or ".." in parts or parts == (".",):
            raise r.error(
                key_node,
                _join(path, link),
                f"link path {link!r} must be relative and stay inside adapter_dir's parent",
            )
        links[link] = _model_ref(r, value_node, _join(path, link))
    return links


def _named(kind: str, build: Callable[[_Reader, str, Node, str, Node], Any]) -> Converter:
    """A mapping of name -> section, each name checked as a safe model/endpoint name."""

    def convert(r: _Reader, node: Node, path: str) -> dict[str, Any]:
        out = {}
        for name, (key_node, value_node) in r.pairs(node, path).items():
            try:
                check_name(kind, name)
            except UsageError as e:
                raise r.error(key_node, _join(path, name), e.message, e.hint) from None
            out[name] = build(r, name, value_node, _join(path, name), key_node)
        return out

    return convert


def _http_url(r: _Reader, node: Node, path: str) -> str:
    value = _str(r, node, path)
    if not value.startswith(("http://", "https://")):
        raise r.error(node, path, f"{value!r} must start with http:// or https://")
    return value


def _json_value(r: _Reader, node: Node, path: str) -> Any:
    if isinstance(node, MappingNode):
        return {k: _json_value(r, v, _join(path, k)) for k, (_, v) in r.pairs(node, path).items()}
    if isinstance(node, SequenceNode):
        return [_json_value(r, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
    return _scalar(r, node, path, {_STR, _INT, _FLOAT, _BOOL, _NULL}, "a JSON value")


def _json_object(r: _Reader, node: Node, path: str) -> dict[str, Any]:
    if not isinstance(node, MappingNode):
        raise r.error(node, path, f"expected a mapping (a JSON object), got {_describe(node)}")
    return _json_value(r, node, path)


_HEALTH: Schema = {
    "suite": (_str, False),
    "engine": (_enum(*HEALTH_ENGINES), False),
    "command": (_command, False),
    "timeout_s": (_seconds, False),
    "env": (_str_map, False),
    "url": (_http_url, False),
    "mode": (_enum(*HTTP_MODES), False),
    "model": (_str, False),
    "request_template": (_json_object, False),
    "response_path": (_str, False),
    "headers": (_str_map, False),
    "discriminator": (_str, False),
    "base_command": (_command, False),
    "base": (_str, False),
    "adapter": (_str, False),
    "gguf": (_str, False),
    "lora": (_str, False),
    "base_gguf": (_str, False),
    "n_ctx": (_int(1), False),
    "stop": (_str_list, False),
    "max_tokens": (_int(1), False),
    "prompt_template": (_str, False),
    "python": (_str, False),
}
_HEALTH_ONLY = {  # keys that belong to one engine: anywhere else they are a mistake
    "command": ("command",),
    "http": ("url", "mode", "model", "request_template", "response_path", "headers"),
    "mlx": ("base", "adapter"),
    "llamacpp": ("gguf", "lora", "base_gguf", "n_ctx", "stop"),
}


def _health(r: _Reader, node: Node, path: str) -> HealthSpec:
    values, nodes = r.fields(node, path, _HEALTH)
    spec = HealthSpec(**values)
    for engine, keys in _HEALTH_ONLY.items():
        for key in keys:
            if (
                key in nodes
                and spec.engine != engine
                and not (spec.engine == "auto" and engine in ("mlx", "llamacpp"))
            ):
                raise r.error(nodes[key], f"{path}.{key}", f"only used when engine is {engine!r}")
    if spec.suite == "none" and "command" in nodes:
        raise r.error(
            nodes["command"],
            f"{path}.command",
            "suite is 'none', so this command would never run",
            "give a suite (e.g. suite: translation_en_es) or remove the command",
        )
    if spec.engine == "command" and spec.suite != "none" and spec.command is None:
        raise r.error(node, f"{path}.command", "required when engine is 'command' and suite is not 'none'")
    if spec.engine == "mlx" and spec.suite != "none" and spec.base is None:
        raise r.error(
            node, f"{path}.base", "required when engine is 'mlx' (the base model dir on the endpoint)"
        )
    if spec.engine == "http" and spec.suite != "none" and spec.url is None:
        raise r.error(node, f"{path}.url", "required when engine is 'http' and suite is not 'none'")
    if (spec.discriminator is None) != (spec.base_command is None):
        missing = "base_command" if spec.base_command is None else "discriminator"
        raise r.error(node, f"{path}.{missing}", "discriminator and base_command go together")
    if spec.mode == "json":
        for key in ("request_template", "response_path"):
            if key not in values:
                raise r.error(nodes.get("mode", node), f"{path}.{key}", "required when mode is 'json'")
        if "{input}" not in json.dumps(spec.request_template, ensure_ascii=False):
            raise r.error(
                nodes["request_template"], f"{path}.request_template", 'must contain "{input}" somewhere'
            )
    if spec.suite.startswith("~") or "/" in spec.suite or spec.suite.endswith((".yaml", ".yml")):
        spec = replace(spec, suite=str(r.local_path(spec.suite)))
    return spec


def _quant(r: _Reader, node: Node, path: str) -> str:
    from adapterctl.convert import check_quant

    try:
        return check_quant(_str(r, node, path))
    except UsageError as e:
        raise r.error(node, path, e.message, e.hint) from None


_CONVERT: Schema = {"format": (_str, False), "quant": (_quant, False), "fidelity": (_bool, False)}


def _convert_setting(r: _Reader, node: Node, path: str, kinds: tuple[str, ...]) -> ConvertSetting:
    """`format` or {format, quant, fidelity}; the format must suit every kind in `kinds`."""
    from adapterctl.convert import FORMATS

    if isinstance(node, ScalarNode):
        values, nodes = {"format": _str(r, node, path)}, {"format": node}
    else:
        values, nodes = r.fields(node, path, _CONVERT)
    fmt = values.get("format")
    for kind in kinds:
        if fmt is not None and fmt not in FORMATS[kind]:
            where = f"{path}.format" if nodes["format"] is not node else path
            raise r.error(
                nodes["format"],
                where,
                f"format {fmt!r} is not one for kind {kind}; expected one of: {', '.join(FORMATS[kind])}"
                + _suggest(fmt, FORMATS[kind]),
            )
    if "quant" in values and (fmt not in (None, "merged") or any("merged" not in FORMATS[k] for k in kinds)):
        raise r.error(nodes["quant"], f"{path}.quant", "only used with format: merged (kind gguf)")
    return ConvertSetting(**values)


def _model_convert(r: _Reader, node: Node, path: str) -> dict[str, ConvertSetting]:
    if isinstance(node, ScalarNode):  # one format for every kind (only `peft` fits both)
        setting = _convert_setting(r, node, path, KINDS)
        return dict.fromkeys(KINDS, setting)
    out = {}
    for kind, (key_node, value_node) in r.pairs(node, path).items():
        if kind not in KINDS:
            raise r.error(
                key_node, _join(path, kind), f"unknown endpoint kind {kind!r}", _known("kinds", KINDS)
            )
        out[kind] = _convert_setting(r, value_node, _join(path, kind), (kind,))
    return out


_MODEL: Schema = {
    "source": (_str, True),
    "base_model": (_str, False),
    "base_dir": (_str, False),
    "convert": (_model_convert, False),
    "health": (_health, False),
}


def _model(r: _Reader, name: str, node: Node, path: str, at: Node) -> ModelConfig:
    values, _ = r.fields(node, path, _MODEL, at)
    base_dir = r.local_path(values["base_dir"]) if "base_dir" in values else None
    if base_dir is None and "base_model" in values and r.local_path(values["base_model"]).is_dir():
        base_dir = r.local_path(values["base_model"])  # base_model names a directory here: that is the base
    return ModelConfig(
        name,
        r.local_path(values["source"]),
        values.get("base_model"),
        values.get("health"),
        base_dir,
        values.get("convert", {}),
    )


def _sha256_hex(r: _Reader, node: Node, path: str) -> str:
    value = _str(r, node, path).lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise r.error(node, path, "must be a sha256 (64 hex digits)", "compute it there: sha256sum FILE")
    return value


_BASE_GGUF: Schema = {"path": (_str, True), "sha256": (_sha256_hex, True)}


_ENDPOINT: Schema = {
    "host": (_token, True),
    "user": (_token, False),
    "port": (_int(1, 65535), False),
    "adapter_dir": (_str, True),
    "kind": (_enum(*KINDS), True),
    "reload_method": (_enum(*RELOAD_METHODS), True),
    "pidfile": (_str, False),
    "unit": (_token, False),
    "reload_timeout_s": (_seconds, False),
    "allow_outage": (_bool, False),
    "models": (_model_list, False),
    "compat_links": (_compat_links, False),
    "convert": (lambda r, node, path: node, False),  # checked against `kind` in _endpoint
    "base_gguf": (lambda r, node, path: node, False),
}


def _endpoint(r: _Reader, name: str, node: Node, path: str, at: Node) -> EndpointConfig:
    v, nodes = r.fields(node, path, _ENDPOINT, at)
    for method, key in (("sigusr1", "pidfile"), ("restart", "unit")):
        if v["reload_method"] == method and key not in v:
            raise r.error(nodes["reload_method"], f"{path}.{key}", f"required when reload_method is {method}")
    local = v["host"] == LOCAL_HOST
    v["adapter_dir"] = _endpoint_path(
        r, nodes["adapter_dir"], f"{path}.adapter_dir", v["adapter_dir"], local, None
    )
    if "pidfile" in v:  # a relative pidfile lives under the adapter_dir
        v["pidfile"] = _endpoint_path(
            r, nodes["pidfile"], f"{path}.pidfile", v["pidfile"], local, v["adapter_dir"]
        )
    if "convert" in v:
        v["convert"] = _convert_setting(r, v["convert"], f"{path}.convert", (v["kind"],))
    if "base_gguf" in v:
        bg, bg_nodes = r.fields(v["base_gguf"], f"{path}.base_gguf", _BASE_GGUF, v["base_gguf"])
        if v["kind"] != "gguf":
            raise r.error(nodes["base_gguf"], f"{path}.base_gguf", "only used when kind is gguf")
        bg["path"] = _endpoint_path(r, bg_nodes["path"], f"{path}.base_gguf.path", bg["path"], local, None)
        v["base_gguf"] = BaseGguf(**bg)
    if v.get("convert") and v["convert"].format == "lora" and "base_gguf" not in v:
        raise r.error(
            nodes["convert"],
            f"{path}.base_gguf",
            "required with format: lora (the base GGUF on the endpoint: {path, sha256})",
        )
    for link, target in v.get("compat_links", {}).items():
        if "models" in v and target not in v["models"]:  # the link would dangle: no `active` for it here
            link_node = r.pairs(nodes["compat_links"], path)[link][1]
            raise r.error(
                link_node, f"{path}.compat_links.{link}", f"model {target!r} is not in this endpoint's models"
            )
    return EndpointConfig(name=name, **v)


def _endpoint_path(r: _Reader, node: Node, path: str, value: str, local: bool, base: str | None) -> str:
    """Local endpoints resolve paths like any local path; remote ones only against `base`, never `~`."""
    if local:  # normalised: `adapter_dir/../run` must work before adapter_dir exists
        return os.path.normpath(Path(base or r.base) / Path(value).expanduser())
    if value.startswith("~") or (base is None and not value.startswith("/")):
        raise r.error(
            node,
            path,
            f"{value!r} must be an absolute path on the endpoint",
            "'~' and relative paths are only resolved for host: local",
        )
    return posixpath.normpath(posixpath.join(base, value)) if base else posixpath.normpath(value)


_TOP: Schema = {
    "store": (_str, False),
    "keep_releases": (_int(2), False),
    "lock_stale_after_s": (_seconds, False),
    "models": (_named("model", _model), False),
    "endpoints": (_named("endpoint", _endpoint), False),
}


# --- small helpers ---------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "no value"
    tag = node.tag.removeprefix(_T)
    kind = _KINDS_OF_SCALAR.get(tag, f"a {tag} value")
    return f"{kind} {node.value!r}"


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _known(noun: str, options: Iterable[str]) -> str:
    return f"valid {noun}: {', '.join(options) or '(none defined)'}"


def _lookup(kind: str, name: str, table: Mapping[str, Any], path: Path):
    if name in table:
        return table[name]
    raise UsageError(
        f"unknown {kind} {name!r}{_suggest(name, table)} (known {kind}s: {', '.join(table) or 'none'})",
        f"{kind}s are defined in {path}",
    )


# --- command-line arguments (decided before anything heavy is imported or any endpoint contacted) ---


def split_names(values: Iterable[str] | None) -> list[str]:
    """Accept repeated flags and space/comma separated lists: ['a b', 'c,d'] → [a, b, c, d]."""
    out: list[str] = []
    for v in values or ():
        for part in v.replace(",", " ").split():
            if part not in out:
                out.append(part)
    return out


def check_parallel(parallel: int) -> None:
    if parallel < 1:
        raise UsageError(
            f"--parallel must be at least 1, got {parallel}", "it is how many endpoints run at once"
        )


def check_deploy_options(
    cycle: int | None,
    version: str | None,
    parallel: int,
    all_adapters: bool = False,
    models: Iterable[str] = (),
) -> None:
    """Refuse deploy options that cannot mean anything together. Raises UsageError."""
    check_parallel(parallel)
    if cycle is not None and version is not None:
        raise UsageError(
            "--cycle and --version cannot be used together: --cycle registers the newest adapter, "
            "--version deploys one that is already registered",
            "drop one of them",
        )
    if all_adapters and list(models):
        raise UsageError("--all-adapters and --models cannot be used together", "drop one of them")
    from adapterctl.names import check_cycle, check_version_id

    if cycle is not None:
        check_cycle(cycle)
    if version is not None:
        check_version_id(version)


ROLLBACK_TARGETS = ("previous", "last-good", "base")


def check_rollback_target(to: str) -> None:
    """`rollback --to`: previous, last-good, base or a well-formed version id. Raises UsageError."""
    from adapterctl.names import check_version_id

    if to not in ROLLBACK_TARGETS:
        try:
            check_version_id(to)
        except UsageError as exc:
            raise UsageError(f"--to: {exc.message}{_suggest(to, ROLLBACK_TARGETS)}", exc.hint) from None
