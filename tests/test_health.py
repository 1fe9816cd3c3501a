"""Health-check framework: suites, matching, the command engine and the runner, on real processes."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import unicodedata
from pathlib import Path

import pytest

from adapterctl.errors import ConfigError, PhaseError
from adapterctl.health import (
    BUILTIN_SUITES,
    CommandEngine,
    Expectation,
    HealthCase,
    HealthSuite,
    HealthTarget,
    format_failures,
    load_suite,
    make_engine,
    match,
    resolve_suite,
    run_suite,
)
from adapterctl.transports.local import LocalTransport

TRANSLATOR = Path(__file__).parent / "data" / "translator.py"
DEFAULT = resolve_suite("translation_en_es", Path("."))


def translator(mode: str, *args: str, timeout_s: float = 10.0) -> CommandEngine:
    return CommandEngine([sys.executable, str(TRANSLATOR), mode, *args], timeout_s=timeout_s)


def target_for(release: Path | str = "/srv/adapters/gemma_4b/releases/cycle1_20260401_0a1b2c3d"):
    return HealthTarget(
        endpoint="test",
        model="gemma_4b",
        version_id="cycle1_20260401_0a1b2c3d",
        release_path=str(release),
        adapter_dir="/srv/adapters",
        base_model=None,
        transport=LocalTransport("test"),
    )


def assert_reaped(pid: int) -> None:
    # A zombie would still be our child; a reaped process is not.
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- matching -----------------------------------------------------------------------------------


def test_match_casefolds_the_needle_as_well_as_the_output():
    assert match(Expectation(any_of=("Jacobo", "Santiago")), "el apóstol SANTIAGO") == (True, "")


def test_match_normalizes_decomposed_accents_on_both_sides():
    nfd = unicodedata.normalize("NFD", "la expiación")
    assert match(Expectation(any_of=("expiación",)), nfd)[0]
    assert match(Expectation(any_of=(unicodedata.normalize("NFD", "EXPIACIÓN"),)), "la expiación")[0]


def test_word_match_rejects_fe_inside_other_words():
    expect = Expectation(all_of=("gracia", "fe"), word=True)
    assert match(expect, "Por gracia, un café.") == (False, "missing all_of 'fe' (word)")
    assert not match(expect, "gracia y cafe feliz")[0]
    # Without NFC, the combining accent of a decomposed "fé" would end the word after "fe".
    assert not match(expect, unicodedata.normalize("NFD", "gracia y fé"))[0]
    assert match(expect, "Por gracia, por medio de la fe.")[0]


def test_match_reports_each_failed_expectation_in_words():
    assert match(Expectation(any_of=("expiaci", "redenci")), "hola") == (
        False,
        "expected any of ['expiaci', 'redenci']",
    )
    assert match(Expectation(not_any_of=("error",)), "Error!") == (False, "found not_any_of 'error'")
    assert match(Expectation(regex=r"^el\b"), "la casa") == (False, "no match for regex '^el\\\\b'")
    assert match(Expectation(regex=r"^EL\b"), "el libro")[0]


def test_every_case_requires_non_empty_output():
    assert match(Expectation(not_any_of=("x",)), "  \t") == (False, "empty output")
    assert match(Expectation(non_empty=True), "Amén.") == (True, "")


# -- suites -------------------------------------------------------------------------------------


def test_builtin_suite_resolves_by_name_and_none_disables_the_check(tmp_path):
    suite = resolve_suite("translation_en_es", tmp_path)
    assert suite.name == "translation_en_es" and len(suite.cases) == 5 and suite.max_latency_s == 5.0
    assert suite.cases[3].expect == Expectation(all_of=("gracia", "fe"), word=True)
    assert resolve_suite("none", tmp_path) is None
    assert Path(suite.source) == BUILTIN_SUITES["translation_en_es"]


def test_suite_path_resolves_relative_to_the_config_directory(tmp_path):
    write(tmp_path, "cases:\n  - input: hi\n    regex: 'ho+la'\n    max_latency_s: 1\n", "mine.yaml")
    suite = resolve_suite("mine.yaml", tmp_path)
    assert suite.name == "mine" and suite.cases == (HealthCase("hi", Expectation(regex="ho+la"), 1.0),)


def test_missing_suite_file_names_the_path_and_the_builtin_suites(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_suite("suites/nope.yaml", tmp_path)
    assert str(tmp_path / "suites/nope.yaml") in str(err.value)
    assert "translation_en_es" in str(err.value)


BAD_TYPE = """\
name: broken
max_latency_s: 5.0
cases:
  - input: "Good morning."
    any_of: [buen]
  - input: "Amen."
    any_of: amen
"""


def test_suite_type_error_names_file_line_and_key(tmp_path):
    path = write(tmp_path, BAD_TYPE)
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert str(err.value) == f"{path}:7: cases[2].any_of: expected a list of strings"


def test_unknown_suite_key_suggests_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "cases:\n  - input: hi\n    anyof: [hola]\n")
    with pytest.raises(
        ConfigError, match=r"suite.yaml:3: cases\[1\]\.anyof: unknown key 'anyof'; did you mean 'any_of'\?"
    ):
        load_suite(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cases: [\n  - input: hi\n", r"suite.yaml:2: malformed YAML: expected the node content"),
        ("name: x\ncases: []\n", r"suite.yaml:2: cases: expected a non-empty list"),
        ("name: x\n", r"suite.yaml:1: cases: missing"),
        (
            "cases:\n  - input: hi\n    regex: '(unclosed'\n",
            r"suite.yaml:3: cases\[1\]\.regex: invalid regex",
        ),
        ("cases:\n  - input: hi\n    word: true\n", r"suite.yaml:2: cases\[1\]: no expectation"),
        (
            "cases:\n  - input: 12\n    non_empty: true\n",
            r"suite.yaml:2: cases\[1\]\.input: expected a string",
        ),
        ("max_latency_s: fast\ncases:\n  - {input: hi, non_empty: true}\n", r"suite.yaml:1: max_latency_s"),
        ("", r"suite.yaml:1: empty suite"),
    ],
)
def test_invalid_suites_are_config_errors_with_file_and_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_suite(write(tmp_path, text))


# -- running the default suite ------------------------------------------------------------------


@pytest.mark.heavy
def test_default_suite_passes_with_correct_spanish_translations():
    result = run_suite(DEFAULT, translator("good"), target_for())
    assert result.all_passed, format_failures(result)
    assert result.error is None and len(result.cases) == 5
    assert 0 < result.latency_p50_ms <= result.latency_p95_ms < 5000
    assert result.engine.startswith("command: ") and "good" in result.engine


@pytest.mark.heavy
def test_failing_case_shows_the_actual_output():
    result = run_suite(DEFAULT, translator("wrong"), target_for())
    assert not result.all_passed and result.error is None
    [failure] = result.failures
    assert failure.output == "El apóstol James escribió sobre la fe y las obras."
    assert format_failures(result) == [
        '  ✗ "The apostle James wrote…" → "El apóstol James escribió sobre la fe y las obras."'
        " (expected any of ['Jacobo', 'Santiago'])"
    ]
    report = json.loads(json.dumps(result.to_dict()))
    assert report["failures"][0]["reason"] == "expected any of ['Jacobo', 'Santiago']"
    assert report["cases"] == 5 and report["all_passed"] is False


@pytest.mark.heavy
def test_fe_inside_cafe_does_not_satisfy_the_word_case():
    result = run_suite(DEFAULT, translator("cafe"), target_for())
    assert [(f.output, f.reason) for f in result.failures] == [
        ("Por gracia, un café.", "missing all_of 'fe' (word)")
    ]


@pytest.mark.heavy
def test_slow_answer_fails_the_latency_limit():
    suite = HealthSuite(
        "quick",
        (
            # the first answer includes the program's start-up: its own limit, loose for a loaded machine
            HealthCase("Amen.", Expectation(non_empty=True), max_latency_s=30.0),
            HealthCase("slow one", Expectation(non_empty=True), None),  # the suite's 0.2 s
            HealthCase("slow one", Expectation(non_empty=True), max_latency_s=30.0),
        ),
        max_latency_s=0.2,
    )
    result = run_suite(suite, translator("slow", "slow one", "0.4"), target_for())
    assert [c.passed for c in result.cases] == [True, False, True]
    took = re.fullmatch(r"took (\d+\.\d\d) s > 0\.20 s", result.cases[1].reason)
    assert took and float(took[1]) >= 0.4, result.cases[1].reason  # it slept 0.4 s: no load makes it faster


@pytest.mark.heavy
def test_latency_percentiles_use_nearest_rank_on_the_injected_clock():
    ticks = iter([0.0, 0.010, 1.0, 1.030, 2.0, 2.020, 3.0, 3.040, 4.0, 4.500])
    result = run_suite(DEFAULT, translator("good"), target_for(), clock=lambda: next(ticks))
    assert [c.latency_ms for c in result.cases] == [10.0, 30.0, 20.0, 40.0, 500.0]
    assert (result.latency_p50_ms, result.latency_p95_ms) == (30.0, 500.0)


# -- engine failures ----------------------------------------------------------------------------


@pytest.mark.heavy
def test_engine_crash_mid_suite_gives_an_error_result_and_leaves_no_zombie(tmp_path):
    fds_before = open_fds()
    engine = translator("crash")
    engine.env["PIDFILE"] = str(tmp_path / "pid")
    result = run_suite(DEFAULT, engine, target_for())
    assert not result.all_passed
    assert [c.reason for c in result.cases[2:]] == ["engine error"] * 3
    assert all(c.passed for c in result.cases[:2])
    assert "endpoint test: model gemma_4b" in result.error and "translator.py crash" in result.error
    assert "exit code 3" in result.error and "adapter weights are corrupt" in result.error
    assert format_failures(result)[0].startswith("  ✗ engine error: endpoint test")
    assert_reaped(int((tmp_path / "pid").read_text()))
    assert open_fds() == fds_before


@pytest.mark.heavy
def test_engine_that_stops_answering_is_killed_after_its_timeout(tmp_path):
    engine = translator("hang", timeout_s=2.0)  # its first answer, start-up included, must beat this
    engine.env["PIDFILE"] = str(tmp_path / "pid")
    with engine:
        engine.start(target_for())
        assert engine.generate("Amen.") == "Amén."
        started = time.monotonic()
        with pytest.raises(PhaseError, match=r"no output line within 2 s \(killed\).*exit code -9"):
            engine.generate("Amen.")
        # killed at timeout_s, not after the translator's 60 s hang (loose enough for a loaded machine)
        assert time.monotonic() - started < 10
        with pytest.raises(PhaseError):
            engine.generate("Amen.")  # a failed engine stays failed
    assert_reaped(int((tmp_path / "pid").read_text()))


@pytest.mark.heavy
def test_non_utf8_output_is_an_engine_error():
    with engine_started(translator("binary")) as engine, pytest.raises(PhaseError, match="non-UTF-8"):
        engine.generate("Amen.")


@pytest.mark.heavy
def test_missing_program_is_an_engine_error_not_a_crash():
    engine = CommandEngine(["/nonexistent/translate", "{release}"])
    result = run_suite(DEFAULT, engine, target_for())
    assert "cannot start health command" in result.error
    assert [c.reason for c in result.cases] == ["engine error"] * 5


def engine_started(engine: CommandEngine, release: Path | str = "/r") -> CommandEngine:
    engine.start(target_for(release))
    return engine


# -- the command template -----------------------------------------------------------------------


@pytest.mark.heavy
def test_placeholders_are_substituted_per_argument_and_passed_in_env(tmp_path):
    release = tmp_path / "rel éase dir"
    argv = [sys.executable, str(TRANSLATOR), "args", "{release}", "--model={model}", "{version}"]
    argv += ["{endpoint}:{adapter_dir}", "{{literal}}"]
    with engine_started(CommandEngine(argv, env={"EXTRA": "1"}), release) as engine:
        seen = json.loads(engine.generate("multi\nline input"))
        assert json.loads(engine.generate("again"))["argv"][0] == str(release)
    assert seen["argv"] == [
        str(release),
        "--model=gemma_4b",
        "cycle1_20260401_0a1b2c3d",
        "test:/srv/adapters",
        "{literal}",
    ]
    assert seen["env"] == {
        "ADAPTERCTL_RELEASE": str(release),
        "ADAPTERCTL_MODEL": "gemma_4b",
        "ADAPTERCTL_VERSION": "cycle1_20260401_0a1b2c3d",
    }


@pytest.mark.heavy
def test_embedded_newlines_in_an_input_are_sent_as_one_line():
    with engine_started(translator("echo")) as engine:
        assert engine.generate("one\ntwo\r\nthree") == "one two three"
        assert engine.generate("next") == "next"


def test_unknown_placeholder_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown placeholder \{relase\}.*\{release\}"):
        CommandEngine(["translate", "{relase}"])


def test_make_engine_builds_a_command_engine_and_describes_it():
    engine = make_engine({"command": ["python3", "translate.py", "{release}"], "timeout_s": 5})
    assert engine.describe() == "command: python3 translate.py {release}"
    assert engine.timeout_s == 5.0


def test_model_engines_are_registered_and_check_their_spec():
    with pytest.raises(ConfigError, match="needs `base:`"):
        make_engine({"engine": "mlx"})
    assert make_engine({"engine": "mlx", "base": "/models/tiny"}).describe().startswith("mlx: /models/tiny")
    assert make_engine({"engine": "llamacpp"}).describe().startswith("llamacpp: ")


def test_unknown_engine_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid engines: command, mlx, llamacpp, http"):
        make_engine({"engine": "vllm", "command": ["x"]})


def test_issue_acceptance_cases_for_accents_case_and_words():
    from adapterctl.health.suite import Expectation, match

    assert match(Expectation(any_of=("Jacobo",)), "el apóstol jacobo")[0]
    nfd = unicodedata.normalize("NFD", "la expiación de Cristo")
    assert nfd != unicodedata.normalize("NFC", nfd)
    assert match(Expectation(any_of=("expiaci",)), nfd)[0]
    assert not match(Expectation(all_of=("fe",), word=True), "un trabajo perfecto")[0]
    assert match(Expectation(all_of=("fe",), word=True), "por medio de la fe")[0]


def test_health_modules_import_one_way_with_no_cycle():
    """engines → engine_mlx/engine_llamacpp → command → base: no module imports one above it."""
    import ast

    import adapterctl.health

    pkg = Path(adapterctl.health.__file__).parent
    imports = {}
    for path in pkg.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterctl.health."):
                found.add(node.module.rsplit(".", 1)[-1])
        imports[path.stem] = found - {path.stem}
    for module in imports:  # depth-first from each module: reaching it again is a cycle
        seen, todo = set(), list(imports[module])
        while todo:
            name = todo.pop()
            assert name != module, f"health.{module} imports itself through {sorted(seen)}"
            if name not in seen:
                seen.add(name)
                todo.extend(imports.get(name, ()))
    assert imports["engine_mlx"] == imports["engine_llamacpp"] == {"base", "command"}
    assert imports["command"] == {"base"} and imports["base"] == set()
