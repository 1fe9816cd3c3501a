"""Health suites: inputs with expectations on the output, loaded from YAML (DESIGN §6)."""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import yaml

from adapterctl.errors import ConfigError


@dataclass(frozen=True)
class Expectation:
    """What an output must (not) contain. Needles are matched NFC-normalized and casefolded."""

    any_of: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()
    not_any_of: tuple[str, ...] = ()
    regex: str | None = None
    non_empty: bool = False
    word: bool = False


@dataclass(frozen=True)
class HealthCase:
    input: str
    expect: Expectation
    max_latency_s: float | None = None  # None: use the suite's limit


@dataclass(frozen=True)
class HealthSuite:
    name: str
    cases: tuple[HealthCase, ...]
    max_latency_s: float = 5.0
    source: str = ""  # file the suite was loaded from, for messages


SUITES_DIR = Path(__file__).parent / "suites"
BUILTIN_SUITES: dict[str, Path] = {"translation_en_es": SUITES_DIR / "translation_en_es.yaml"}


# -- matching ----------------------------------------------------------------------------------


def _fold(text: str) -> str:
    # casefold can denormalize (e.g. 'ǰ'), so normalize again after folding.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def _contains(haystack: str, needle: str, word: bool) -> bool:
    if not word:
        return needle in haystack
    # Lookarounds rather than \b so needles that start or end with punctuation still work.
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


def match(expect: Expectation, output: str) -> tuple[bool, str]:
    """Check `output` against `expect`; return (passed, human reason when it failed, else "")."""
    if not output.strip():
        return False, "empty output"
    text = _fold(output)
    word = " (word)" if expect.word else ""
    reasons = []
    if expect.any_of and not any(_contains(text, _fold(n), expect.word) for n in expect.any_of):
        reasons.append(f"expected any of {list(expect.any_of)}{word}")
    missing = [n for n in expect.all_of if not _contains(text, _fold(n), expect.word)]
    if missing:
        reasons.append(f"missing all_of {', '.join(map(repr, missing))}{word}")
    found = [n for n in expect.not_any_of if _contains(text, _fold(n), expect.word)]
    if found:
        reasons.append(f"found not_any_of {', '.join(map(repr, found))}{word}")
    if expect.regex is not None and not re.search(
        expect.regex, unicodedata.normalize("NFC", output), re.IGNORECASE
    ):
        reasons.append(f"no match for regex {expect.regex!r}")
    return not reasons, "; ".join(reasons)


# -- loading -----------------------------------------------------------------------------------

_SUITE_KEYS = ("name", "max_latency_s", "cases")
_CASE_KEYS = ("input", "any_of", "all_of", "not_any_of", "regex", "non_empty", "word", "max_latency_s")
_TAG = "tag:yaml.org,2002:"


class _SuiteReader:
    """Turns a composed YAML node tree into a HealthSuite, citing file:line:key on every error."""

    def __init__(self, path: Path, loader: yaml.SafeLoader):
        self.path = path
        self.loader = loader

    def error(self, node: yaml.Node, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{node.start_mark.line + 1}: {key}: {message}")

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, "expected a mapping")
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{key}.{name}" if key else str(name)
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.error(key_node, where, f"unknown key {name!r}; {hint}")
            if name in fields:
                raise self.error(key_node, where, "duplicate key")
            fields[name] = value_node
        return fields

    def string(self, node: yaml.Node, key: str) -> str:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "str"):
            raise self.error(node, key, "expected a string (quote values like yes, no or 12)")
        return node.value

    def strings(self, node: yaml.Node, key: str) -> tuple[str, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else None
        if not items or any(not (isinstance(i, yaml.ScalarNode) and i.tag == _TAG + "str") for i in items):
            raise self.error(node, key, "expected a list of strings")
        if any(not i.value for i in items):
            raise self.error(node, key, "empty strings match everything; remove them")
        return tuple(i.value for i in items)

    def boolean(self, node: yaml.Node, key: str) -> bool:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "bool"):
            raise self.error(node, key, "expected true or false")
        return bool(self.loader.construct_object(node))

    def seconds(self, node: yaml.Node, key: str) -> float:
        if not (isinstance(node, yaml.ScalarNode) and node.tag in (_TAG + "int", _TAG + "float")):
            raise self.error(node, key, "expected a number of seconds")
        value = float(self.loader.construct_object(node))
        if not value > 0:
            raise self.error(node, key, "expected a positive number of seconds")
        return value

    def case(self, node: yaml.Node, key: str) -> HealthCase:
        f = self.mapping(node, key, _CASE_KEYS)
        if "input" not in f:
            raise self.error(node, key, "missing 'input'")
        text = self.string(f["input"], f"{key}.input")
        expect = Expectation(
            any_of=self.strings(f["any_of"], f"{key}.any_of") if "any_of" in f else (),
            all_of=self.strings(f["all_of"], f"{key}.all_of") if "all_of" in f else (),
            not_any_of=self.strings(f["not_any_of"], f"{key}.not_any_of") if "not_any_of" in f else (),
            regex=self.string(f["regex"], f"{key}.regex") if "regex" in f else None,
            non_empty=self.boolean(f["non_empty"], f"{key}.non_empty") if "non_empty" in f else False,
            word=self.boolean(f["word"], f"{key}.word") if "word" in f else False,
        )
        if expect.regex is not None:
            try:
                re.compile(expect.regex, re.IGNORECASE)
            except re.error as exc:
                raise self.error(f["regex"], f"{key}.regex", f"invalid regex: {exc}") from None
        if not (expect.any_of or expect.all_of or expect.not_any_of or expect.regex or expect.non_empty):
            raise self.error(
                node, key, "no expectation; add any_of, all_of, not_any_of, regex or non_empty: true"
            )
        limit = self.seconds(f["max_latency_s"], f"{key}.max_latency_s") if "max_latency_s" in f else None
        return HealthCase(text, expect, limit)

    def suite(self, root: yaml.Node | None) -> HealthSuite:
        if root is None:
            raise ConfigError(f"{self.path}:1: empty suite; expected a mapping with name and cases")
        f = self.mapping(root, "", _SUITE_KEYS)
        name = self.string(f["name"], "name") if "name" in f else self.path.stem
        limit = self.seconds(f["max_latency_s"], "max_latency_s") if "max_latency_s" in f else 5.0
        if "cases" not in f:
            raise self.error(root, "cases", "missing; a suite needs at least one case")
        cases_node = f["cases"]
        if not isinstance(cases_node, yaml.SequenceNode) or not cases_node.value:
            raise self.error(cases_node, "cases", "expected a non-empty list of cases")
        # Cases are numbered from 1, as a person counts them in the file.
        cases = tuple(self.case(n, f"cases[{i}]") for i, n in enumerate(cases_node.value, 1))
        return HealthSuite(name, cases, limit, str(self.path))


def load_suite(path: Path) -> HealthSuite:
    """Load and validate a suite file.

    Raises ConfigError naming file:line: key for unreadable or malformed YAML, unknown keys
    (with the closest valid one), wrong types, no cases, a case without expectation or a bad regex.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read health suite: {exc}") from exc
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return _SuiteReader(path, loader).suite(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{line}: malformed YAML: {problem}") from None
    finally:
        loader.dispose()


def resolve_suite(ref: str, base_dir: Path) -> HealthSuite | None:
    """Return the suite `ref` names: "none" → None, a builtin name, or a YAML path under base_dir.

    Raises ConfigError when the file does not exist or does not load.
    """
    if ref == "none":
        return None
    if ref in BUILTIN_SUITES:
        return load_suite(BUILTIN_SUITES[ref])
    path = Path(base_dir) / ref  # an absolute ref replaces base_dir
    if not path.is_file():
        raise ConfigError(
            f"health suite {ref!r}: no such file {path}",
            f"use a builtin suite ({', '.join(sorted(BUILTIN_SUITES))}), 'none', or a path to a YAML file",
        )
    return load_suite(path)
