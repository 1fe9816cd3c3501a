"""adapterctl.yaml: search order, parsing into frozen values, and one-line file:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterctl.config import HealthSpec, find_config, load_config
from adapterctl.errors import ConfigError, UsageError

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"

# Lines 1-6; keys appended by ep() land on line 7.
ENDPOINT = """\
endpoints:
  mac-dev:
    host: mac-dev
    adapter_dir: /srv/adapters
    kind: mlx
    reload_method: none
"""
# Lines 7-9 after ENDPOINT; keys appended by md() land on line 10.
MODEL = """\
models:
  gemma_4b:
    source: ./runs/gemma_4b
"""


def ep(extra: str = "", replace: dict[str, str] | None = None) -> str:
    text = ENDPOINT + extra + MODEL
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    return text


def md(extra: str) -> str:
    return ENDPOINT + MODEL + extra


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cfg dir é"  # paths with spaces and non-ASCII must survive untouched
    d.mkdir()
    return d


def write(directory: Path, text: str, name: str = "adapterctl.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(directory: Path, text: str) -> str:
    path = write(directory, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- loading valid configs -------------------------------------------------------------------


def test_example_config_loads_with_both_real_endpoints_and_three_models():
    cfg = load_config(MANIFESTS / "adapterctl.example.yaml")
    assert set(cfg.models) == {"whisper", "gemma_4b", "gemma_12b"}
    mac, rtx = cfg.endpoint("mac-dev"), cfg.endpoint("church-rtx2070-1")
    assert (mac.kind, mac.reload_method, mac.pidfile) == (
        "mlx",
        "sigusr1",
        "/Users/willem/Code/SRTranslate/run/translate.pid",
    )
    assert (rtx.kind, rtx.reload_method, rtx.unit) == ("gguf", "restart", "stark-translate")
    links = {**mac.compat_links, **rtx.compat_links}
    assert links == {
        "fine_tuned_whisper_mi": "whisper",
        "fine_tuned_gemma_mi_A": "gemma_4b",
        "fine_tuned_gemma_mi_B": "gemma_12b",
    }
    assert cfg.store == MANIFESTS / "adapters"
    assert cfg.model("gemma_4b").health.command == ("python3", "translate.py", "{release}")
    assert not mac.is_local and not rtx.serves("gemma_12b") and mac.serves("gemma_12b")


def test_local_config_resolves_relative_paths_against_its_directory():
    cfg = load_config(MANIFESTS / "adapterctl.local.yaml")
    assert {e.kind for e in cfg.endpoints.values()} == {"mlx", "gguf"}
    for endpoint in cfg.endpoints.values():
        assert endpoint.is_local and endpoint.reload_method == "none"
        assert Path(endpoint.adapter_dir).is_absolute()
        assert Path(endpoint.adapter_dir).is_relative_to(MANIFESTS)
    assert list(cfg.models) == ["gemma_4b"]
    assert cfg.model("gemma_4b").source.is_relative_to(MANIFESTS)


def test_minimal_config_gets_defaults_and_absent_sections_are_empty(cfg_dir):
    cfg = load_config(write(cfg_dir, "keep_releases: 2\n"))
    assert (cfg.keep_releases, cfg.lock_stale_after_s) == (2, 3600.0)
    assert cfg.store == cfg_dir / "adapters"
    assert cfg.endpoints == {} and cfg.models == {}
    assert cfg.path == cfg_dir / "adapterctl.yaml"
    assert load_config(write(cfg_dir, "endpoints: {}\nmodels:\n")).models == {}


def test_endpoint_and_model_values_are_typed_and_defaulted(cfg_dir):
    cfg = load_config(write(cfg_dir, ep("    port: 2222\n    user: willem\n")))
    mac = cfg.endpoint("mac-dev")
    assert (mac.port, mac.user, mac.reload_timeout_s, mac.models, mac.compat_links) == (
        2222,
        "willem",
        10.0,
        None,
        {},
    )
    model = cfg.model("gemma_4b")
    assert model.base_model is None and model.health is None


def test_health_section_becomes_a_health_spec_with_tuple_command(cfg_dir):
    text = md(
        "    health:\n      command: [python3, translate.py, '{release}']\n      timeout_s: 5\n"
        "      env: {HF_HOME: /data/hf}\n"
    )
    health = load_config(write(cfg_dir, text)).model("gemma_4b").health
    assert health == HealthSpec(
        suite="translation_en_es",
        engine="command",
        command=("python3", "translate.py", "{release}"),
        timeout_s=5.0,
        env={"HF_HOME": "/data/hf"},
    )


def test_suite_path_resolves_against_config_dir_but_builtin_names_stay(cfg_dir):
    text = md("    health:\n      suite: suites/my suite.yaml\n      command: [x]\n")
    assert load_config(write(cfg_dir, text)).model("gemma_4b").health.suite == str(
        cfg_dir / "suites/my suite.yaml"
    )
    text = md("    health:\n      suite: none\n")
    assert load_config(write(cfg_dir, text)).model("gemma_4b").health.suite == "none"


def test_relative_paths_resolve_against_config_dir_keeping_spaces_and_non_ascii(cfg_dir, tmp_path):
    text = ep(
        replace={
            "host: mac-dev": "host: local",
            "/srv/adapters": "./endpoint ädapters",
            "./runs/gemma_4b": "../runs/my ådapter",
        },
    )
    text = "store: ./store dir\n" + text
    cfg = load_config(write(cfg_dir, text))
    assert cfg.store == cfg_dir / "store dir"
    assert cfg.endpoint("mac-dev").adapter_dir == str(cfg_dir / "endpoint ädapters")
    assert cfg.model("gemma_4b").source == cfg_dir / ".." / "runs/my ådapter"


def test_tilde_expands_in_store_and_local_paths(cfg_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = "store: ~/store\n" + ep(
        "    pidfile: ~/run/x.pid\n", replace={"host: mac-dev": "host: local", "/srv": "~/srv"}
    )
    cfg = load_config(write(cfg_dir, text))
    assert cfg.store == tmp_path / "home/store"
    assert cfg.endpoint("mac-dev").adapter_dir == str(tmp_path / "home/srv/adapters")
    assert cfg.endpoint("mac-dev").pidfile == str(tmp_path / "home/run/x.pid")


def test_local_relative_pidfile_resolves_against_adapter_dir(cfg_dir):
    text = ep(
        "    pidfile: run/serve.pid\n", replace={"host: mac-dev": "host: local", "/srv/adapters": "adapters"}
    )
    assert load_config(write(cfg_dir, text)).endpoint("mac-dev").pidfile == str(
        cfg_dir / "adapters/run/serve.pid"
    )


def test_merge_keys_share_endpoint_defaults_and_own_keys_win(cfg_dir):
    text = """\
endpoints:
  mac-dev:
    <<: &defaults {host: mac-dev, kind: gguf, reload_method: none, reload_timeout_s: 20}
    adapter_dir: /srv/a
  rtx:
    <<: *defaults
    host: rtx
    adapter_dir: /srv/b
"""
    cfg = load_config(write(cfg_dir, text))
    assert (cfg.endpoint("mac-dev").kind, cfg.endpoint("mac-dev").reload_timeout_s) == ("gguf", 20.0)
    assert (cfg.endpoint("rtx").host, cfg.endpoint("rtx").kind) == ("rtx", "gguf")


# --- errors: one line, file:line: key.path: problem ------------------------------------------


def test_malformed_yaml_reports_yamls_problem_and_line(cfg_dir):
    message = config_error(cfg_dir, "store: ./a\nkeep_releases: 5\nlock_stale_after_s: a: b\n")
    assert message.startswith(
        f"{cfg_dir / 'adapterctl.yaml'}:3: invalid YAML: mapping values are not allowed"
    )


def test_unclosed_flow_list_is_malformed_yaml_with_a_line(cfg_dir):
    message = config_error(cfg_dir, ep("    models: [gemma_4b\n"))
    assert f"{cfg_dir / 'adapterctl.yaml'}:" in message and "invalid YAML" in message


@pytest.mark.parametrize(
    ("text", "found"),
    [("- a\n- b\n", "a list"), ("just text\n", "a string 'just text'")],
    ids=["list", "scalar"],
)
def test_top_level_must_be_a_mapping(cfg_dir, text, found):
    message = config_error(cfg_dir, text)
    assert message.startswith(
        f"{cfg_dir / 'adapterctl.yaml'}:1: (top level): expected a mapping, got {found}"
    )


def test_empty_file_is_an_error_naming_the_file(cfg_dir):
    assert config_error(cfg_dir, "# nothing yet\n").startswith(
        f"{cfg_dir / 'adapterctl.yaml'}:1: (top level):"
    )


def test_missing_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_names_file_line_and_suggests_fix(cfg_dir):
    message = config_error(cfg_dir, ep("    reload_metod: none\n"))
    assert message.startswith(
        f"{cfg_dir / 'adapterctl.yaml'}:7: endpoints.mac-dev.reload_metod: unknown key 'reload_metod'; "
        "did you mean 'reload_method'?"
    )
    assert "valid keys: host, user, port" in message


def test_unknown_top_level_and_model_keys_are_reported_where_they_are(cfg_dir):
    message = config_error(cfg_dir, "keep_release: 3\n")
    assert ":1: keep_release: unknown key 'keep_release'; did you mean 'keep_releases'?" in message
    assert ":10: models.gemma_4b.sorce: unknown key" in config_error(cfg_dir, md("    sorce: ./x\n"))


def test_duplicate_key_is_reported_with_both_lines(cfg_dir):
    message = config_error(cfg_dir, ep("    kind: gguf\n"))
    assert message.startswith(
        f"{cfg_dir / 'adapterctl.yaml'}:7: endpoints.mac-dev.kind: duplicate key (first defined on line 5)"
    )


def test_duplicate_endpoint_name_is_reported(cfg_dir):
    text = ENDPOINT + ENDPOINT.removeprefix("endpoints:\n") + MODEL
    assert ":7: endpoints.mac-dev: duplicate key (first defined on line 2)" in config_error(cfg_dir, text)


@pytest.mark.parametrize("key", ["host", "adapter_dir", "kind", "reload_method"])
def test_missing_required_endpoint_key_is_reported_at_the_endpoint(cfg_dir, key):
    text = "".join(line for line in ep().splitlines(keepends=True) if not line.strip().startswith(f"{key}:"))
    assert f":2: endpoints.mac-dev.{key}: required key is missing" in config_error(cfg_dir, text)


def test_missing_model_source_is_reported_at_the_model(cfg_dir):
    text = ep(replace={"    source: ./runs/gemma_4b\n": "    base_model: x\n"})
    assert ":8: models.gemma_4b.source: required key is missing" in config_error(cfg_dir, text)


def test_required_key_without_value_is_reported_on_its_line(cfg_dir):
    text = ep(replace={"adapter_dir: /srv/adapters": "adapter_dir:"})
    assert ":4: endpoints.mac-dev.adapter_dir: required key has no value" in config_error(cfg_dir, text)


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        # wrong types
        (ep("    port: '22'\n"), 7, "endpoints.mac-dev.port", "expected an integer, got a string '22'"),
        (ep("    port: 70000\n"), 7, "endpoints.mac-dev.port", "must be between 1 and 65535"),
        (ep("    user: yes\n"), 7, "endpoints.mac-dev.user", "expected a string, got a boolean 'yes'"),
        (ep(replace={"host: mac-dev": "host: no"}), 3, "endpoints.mac-dev.host", "got a boolean 'no'"),
        (ep("    unit: 42\n"), 7, "endpoints.mac-dev.unit", "expected a string, got an integer '42'"),
        (ep("    models: gemma_4b\n"), 7, "endpoints.mac-dev.models", "expected a list, got a string"),
        (
            ep("    compat_links: [a]\n"),
            7,
            "endpoints.mac-dev.compat_links",
            "expected a mapping, got a list",
        ),
        ("endpoints: [a]\n", 1, "endpoints", "expected a mapping, got a list"),
        ("1: x\n", 1, "(top level)", "keys must be strings, got an integer '1'"),
        (md("keep_releases: five\n"), 10, "keep_releases", "expected an integer, got a string 'five'"),
        (md("keep_releases: 5.0\n"), 10, "keep_releases", "expected an integer, got a number '5.0'"),
        (md("store: ''\n"), 10, "store", "must not be empty"),
        # enums
        (ep(replace={"kind: mlx": "kind: onnx"}), 5, "endpoints.mac-dev.kind", "expected one of: mlx, gguf"),
        (
            ep(replace={"reload_method: none": "reload_method: sigusr"}),
            6,
            "endpoints.mac-dev.reload_method",
            "invalid value 'sigusr'; expected one of: sigusr1, restart, none; did you mean 'sigusr1'?",
        ),
        (
            ep(replace={"reload_method: none": "reload_method: no"}),
            6,
            "endpoints.mac-dev.reload_method",
            "boolean",
        ),
        # ranges
        (md("keep_releases: 1\n"), 10, "keep_releases", "must be at least 2 (got 1)"),
        (md("lock_stale_after_s: 0\n"), 10, "lock_stale_after_s", "must be a positive number of seconds"),
        (ep("    reload_timeout_s: -1\n"), 7, "endpoints.mac-dev.reload_timeout_s", "positive number"),
        (
            md("    health:\n      timeout_s: 0\n      command: [x]\n"),
            11,
            "models.gemma_4b.health.timeout_s",
            "positive",
        ),
        # reload needs
        (
            ep(replace={"reload_method: none": "reload_method: sigusr1"}),
            6,
            "endpoints.mac-dev.pidfile",
            "required when reload_method is sigusr1",
        ),
        (
            ep(replace={"reload_method: none": "reload_method: restart"}),
            6,
            "endpoints.mac-dev.unit",
            "required when reload_method is restart",
        ),
        # names and references
        (ep(replace={"  mac-dev:": "  mac dev:"}), 2, "endpoints.mac dev", "invalid endpoint name 'mac dev'"),
        (ep(replace={"  gemma_4b:": "  ../evil:"}), 8, "models.../evil", "invalid model name '../evil'"),
        (
            ep("    models: [gemma_4b, gemma_9b]\n"),
            7,
            "endpoints.mac-dev.models[1]",
            "unknown model 'gemma_9b'",
        ),
        (
            ep("    compat_links:\n      fine_tuned_whisper_mi: whisper\n"),
            8,
            "endpoints.mac-dev.compat_links.fine_tuned_whisper_mi",
            "unknown model 'whisper'",
        ),
        (
            ep("    compat_links:\n      fine_tuned_x: bad name\n"),
            8,
            "endpoints.mac-dev.compat_links.fine_tuned_x",
            "invalid model name 'bad name'",
        ),
        (
            ep("    models: [gemma_4b]\n    compat_links: {fine_tuned_w: whisper}\n")
            + "  whisper:\n    source: ./w\n",
            8,
            "endpoints.mac-dev.compat_links.fine_tuned_w",
            "model 'whisper' is not in this endpoint's models",
        ),
        # compat link paths
        (
            ep("    compat_links:\n      /etc/x: gemma_4b\n"),
            8,
            "endpoints.mac-dev.compat_links./etc/x",
            "relative",
        ),
        (
            ep("    compat_links:\n      a/../../x: gemma_4b\n"),
            8,
            "endpoints.mac-dev.compat_links.a/../../x",
            "relative",
        ),
        # remote paths
        (
            ep(replace={"/srv/adapters": "srv/adapters"}),
            4,
            "endpoints.mac-dev.adapter_dir",
            "'srv/adapters' must be an absolute path on the endpoint",
        ),
        (
            ep(replace={"/srv/adapters": "~/adapters"}),
            4,
            "endpoints.mac-dev.adapter_dir",
            "must be an absolute path",
        ),
        (
            ep(replace={"host: mac-dev": "host: -oProxyCommand=x"}),
            3,
            "endpoints.mac-dev.host",
            "must not start with '-'",
        ),
        # health
        (
            md("    health:\n      command: []\n"),
            11,
            "models.gemma_4b.health.command",
            "non-empty list of strings",
        ),
        (
            md("    health:\n      command: python3 t.py\n"),
            11,
            "models.gemma_4b.health.command",
            "expected a list",
        ),
        (
            md("    health:\n      command: [python3, 5]\n"),
            11,
            "models.gemma_4b.health.command[1]",
            "expected a string, got an integer '5'",
        ),
        (
            md("    health:\n      suite: translation_en_es\n"),
            11,
            "models.gemma_4b.health.command",
            "required when engine is 'command'",
        ),
        (
            md("    health:\n      engine: mlx\n"),
            11,
            "models.gemma_4b.health.base",
            "required when engine is 'mlx'",
        ),
        (md("    health:\n      env: {KEY: 1}\n"), 11, "models.gemma_4b.health.env.KEY", "expected a string"),
        (md("    health: none\n"), 10, "models.gemma_4b.health", "expected a mapping, got a string 'none'"),
    ],
    ids=[
        "string_where_int_belongs",
        "port_out_of_range",
        "yes_bool_where_string_belongs",
        "no_bool_as_host",
        "int_where_string_belongs",
        "string_where_list_belongs",
        "list_where_mapping_belongs",
        "endpoints_not_a_mapping",
        "non_string_key",
        "word_where_int_belongs",
        "float_where_int_belongs",
        "empty_store",
        "unknown_kind_lists_valid_ones",
        "reload_method_typo_suggests_fix",
        "bool_as_reload_method",
        "keep_releases_below_two",
        "zero_lock_timeout",
        "negative_reload_timeout",
        "zero_health_timeout",
        "sigusr1_without_pidfile",
        "restart_without_unit",
        "invalid_endpoint_name",
        "invalid_model_name",
        "endpoint_serves_undefined_model",
        "compat_link_to_undefined_model",
        "compat_link_to_invalid_name",
        "compat_link_to_model_the_endpoint_does_not_serve",
        "absolute_compat_link",
        "compat_link_with_dotdot",
        "relative_remote_adapter_dir",
        "tilde_remote_adapter_dir",
        "host_looking_like_an_ssh_option",
        "empty_health_command",
        "health_command_as_string",
        "health_command_with_non_string",
        "health_command_missing_for_text_suite",
        "health_engine_not_supported",
        "health_env_value_not_string",
        "health_not_a_mapping",
    ],
)
def test_invalid_value_names_file_line_and_key(cfg_dir, text, line, key, problem):
    message = config_error(cfg_dir, text)
    assert message.startswith(f"{cfg_dir / 'adapterctl.yaml'}:{line}: {key}: "), message
    assert problem in message


# --- lookups ---------------------------------------------------------------------------------


def test_unknown_endpoint_or_model_lookup_names_it_and_lists_known_ones():
    cfg = load_config(MANIFESTS / "adapterctl.example.yaml")
    with pytest.raises(
        UsageError, match=r"unknown endpoint 'mac-deb'; did you mean 'mac-dev'\?.*church-rtx2070-1"
    ):
        cfg.endpoint("mac-deb")
    with pytest.raises(UsageError, match="unknown model 'llama'.*known models: whisper, gemma_4b, gemma_12b"):
        cfg.model("llama")


# --- search order: --config > $ADAPTERCTL_CONFIG > cwd > parents > ~/.config -----------------


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A config in every searched place; tests delete the ones that should lose."""
    home, parent = tmp_path / "home", tmp_path / "work"
    cwd = parent / "project" / "sub"
    paths = {
        "explicit": tmp_path / "given.yaml",
        "env": tmp_path / "from env.yaml",
        "cwd": cwd / "adapterctl.yaml",
        "parent": parent / "adapterctl.yaml",
        "home": home / ".config/adapterctl/adapterctl.yaml",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    return paths | {"cwd_dir": cwd, "home_dir": home}


def find(places, explicit=None, env=None):
    env = {"ADAPTERCTL_CONFIG": str(places["env"])} if env is None else env
    return find_config(explicit, env, places["cwd_dir"], places["home_dir"])


def test_explicit_flag_wins_over_env_cwd_and_home(places):
    assert find(places, explicit=str(places["explicit"])) == places["explicit"]


def test_env_wins_over_cwd_and_home(places):
    assert find(places) == places["env"]


def test_cwd_wins_over_parent_and_home(places):
    assert find(places, env={}) == places["cwd"]


def test_nearest_parent_is_found_from_a_subdirectory(places):
    places["cwd"].unlink()
    assert find(places, env={}) == places["parent"]


def test_home_config_is_the_last_resort(places):
    places["cwd"].unlink()
    places["parent"].unlink()
    assert find(places, env={}) == places["home"]


def test_relative_explicit_path_is_taken_from_cwd(places):
    assert find(places, explicit="adapterctl.yaml") == places["cwd"]


def test_missing_explicit_path_names_it_and_the_flag(places):
    with pytest.raises(ConfigError, match=r"missing\.yaml \(given by --config\) does not exist"):
        find(places, explicit=str(places["cwd_dir"] / "missing.yaml"))


def test_missing_env_path_names_it_and_the_variable(places):
    with pytest.raises(ConfigError, match=r"nope\.yaml \(given by \$ADAPTERCTL_CONFIG\) does not exist"):
        find(places, env={"ADAPTERCTL_CONFIG": str(places["cwd_dir"] / "nope.yaml")})


def test_nothing_found_lists_every_place_searched_and_how_to_start(places):
    for name in ("cwd", "parent", "home"):
        places[name].unlink()
    with pytest.raises(ConfigError) as e:
        find(places, env={})
    message = str(e.value)
    for searched in (places["cwd"], places["parent"], places["home"], Path("/adapterctl.yaml")):
        assert str(searched) in message
    assert "adapterctl demo" in message and "manifests/adapterctl.example.yaml" in message


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_config_flag_is_an_error_never_a_fallback(places, value):
    with pytest.raises(ConfigError, match=r"^--config is empty"):
        find(places, explicit=value)


def test_empty_env_config_is_an_error_never_a_fallback(places):
    with pytest.raises(ConfigError, match=r"^\$ADAPTERCTL_CONFIG is empty"):
        find(places, env={"ADAPTERCTL_CONFIG": ""})


def test_config_flag_that_is_a_directory_is_named(places):
    with pytest.raises(ConfigError, match=r"is a directory, not a file"):
        find(places, explicit=str(places["cwd_dir"]))


# --- contradictions in a health section ------------------------------------------------------


def test_suite_none_with_a_command_is_a_contradiction_with_file_and_line(cfg_dir):
    message = config_error(cfg_dir, md("    health:\n      suite: none\n      command: [python3, t.py]\n"))
    assert ":12: models.gemma_4b.health.command: suite is 'none'" in message
    assert "remove the command" in message


def test_suite_none_alone_and_a_suite_with_a_command_still_load(cfg_dir):
    assert load_config(write(cfg_dir, md("    health:\n      suite: none\n"))).model("gemma_4b").health
    text = md("    health:\n      suite: translation_en_es\n      command: [python3, t.py]\n")
    assert load_config(write(cfg_dir, text)).model("gemma_4b").health.command == ("python3", "t.py")


# --- option combinations (checked before the config is read) ---------------------------------


def test_option_combinations_that_mean_nothing_are_refused():
    from adapterctl.config import check_deploy_options, check_parallel

    with pytest.raises(UsageError, match="--cycle and --version cannot be used together"):
        check_deploy_options(1, "cycle1_20260101_aaaaaaaa", 4)
    with pytest.raises(UsageError, match="--all-adapters and --models"):
        check_deploy_options(1, None, 4, True, ["gemma_4b"])
    for bad in (0, -3):
        with pytest.raises(UsageError, match=f"--parallel must be at least 1, got {bad}"):
            check_parallel(bad)
    check_deploy_options(1, None, 1, True, [])
    check_deploy_options(None, "cycle1_20260101_aaaaaaaa", 8, False, ["gemma_4b"])


# --- checks made before anything is written (api) ---------------------------------------------


def _health_cfg(cfg_dir: Path, command: str, host: str = "local", adapter_dir: str = "ep/adapters"):
    text = ep(replace={"host: mac-dev": f"host: {host}", "/srv/adapters": adapter_dir}) + (
        f"    health:\n      command: {command}\n"
    )
    return load_config(write(cfg_dir, text))


def test_a_health_program_missing_here_is_a_config_error_for_a_local_endpoint(cfg_dir):
    from adapterctl.api import _check_health_config

    cfg = _health_cfg(cfg_dir, "[no-such-program-x, '{release}']")
    with pytest.raises(ConfigError, match=r"models\.gemma_4b\.health\.command: program 'no-such-program-x'"):
        _check_health_config(cfg, ["gemma_4b"], ["mac-dev"])
    _check_health_config(_health_cfg(cfg_dir, "[python3, t.py]"), ["gemma_4b"], ["mac-dev"])
    _check_health_config(_health_cfg(cfg_dir, "['{release}/run', x]"), ["gemma_4b"], ["mac-dev"])


def test_a_health_program_is_not_looked_for_on_an_ssh_endpoint_unless_it_runs_here(cfg_dir):
    from adapterctl.api import _check_health_config

    cfg = _health_cfg(cfg_dir, "[no-such-program-x]", host="mac-dev", adapter_dir="/srv/adapters")
    _check_health_config(cfg, ["gemma_4b"], ["mac-dev"])  # it runs on the endpoint: not checked here
    with pytest.raises(ConfigError, match="no-such-program-x"):
        _check_health_config(cfg, ["gemma_4b"], ["mac-dev"], here=True)  # --health-local


def test_a_missing_adapter_dir_parent_is_refused_naming_endpoint_path_and_fix(cfg_dir):
    from adapterctl.api import _refuse_missing_parents
    from adapterctl.facts import parse

    cfg = load_config(write(cfg_dir, ep()))
    _refuse_missing_parents(cfg, {"mac-dev": parse("mac-dev", {"parent_exists": True})})
    _refuse_missing_parents(cfg, {"mac-dev": parse("mac-dev", {"problem": "a file is in the way"})})
    with pytest.raises(
        UsageError, match="parent /srv of adapter_dir /srv/adapters does not exist on mac-dev"
    ):
        _refuse_missing_parents(cfg, {"mac-dev": parse("mac-dev", {"parent_exists": False})})


def test_endpoint_facts_say_whether_adapter_dir_parent_exists(tmp_path):
    from adapterctl.endpoint_ops import facts

    assert facts(str(tmp_path / "adapters"), [])["parent_exists"] is True
    assert facts(str(tmp_path / "typo" / "adapters"), [])["parent_exists"] is False
    assert not (tmp_path / "typo").exists()
