"""Node configuration (phoenix_node/config.py): precedence defaults < TOML < PHOENIX_*
environment < flags, and every bad value is a ConfigError naming where it came from."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phoenix_node.cli import build_parser
from phoenix_node.config import (
    OPTIONS,
    ConfigError,
    NodeConfig,
    load_config,
    options_markdown,
)

from ..conftest import REPO_ROOT


def flags(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def toml(tmp_path: Path, text: str, name: str = "node.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- declared once -------------------------------------------------------------------------


def test_defaults_come_from_the_declarations() -> None:
    config = load_config(None, env={})
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    for o in OPTIONS:
        default = tuple(o.default) if o.multiple else o.default
        assert getattr(config, o.name) == default, o.name
        field_default = fields[o.name].default
        assert field_default == default, f"NodeConfig.{o.name} drifted from OPTIONS"
    assert set(fields) - {"extra"} == {o.name for o in OPTIONS}


def test_env_names_and_flags_follow_the_option_names() -> None:
    for o in OPTIONS:
        assert o.env == "PHOENIX_" + o.name.upper()
        assert o.flag == "--" + o.name.replace("_", "-")


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    with open(os.path.join(REPO_ROOT, "docs", "configuration.md")) as f:
        docs = f.read()
    assert options_markdown() in docs, "docs/configuration.md is out of date with OPTIONS"


# --- precedence ----------------------------------------------------------------------------


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        'workers = 3\nbatch_size = 50\ndurability = "buffered"\nidle_timeout = 7\n'
        'agents = ["a.b:C"]\nentry_points = false\n',
    )
    env = {"PHOENIX_BATCH_SIZE": "60", "PHOENIX_IDLE_TIMEOUT": "8.5", "PHOENIX_WORKERS": "4"}
    config = load_config(flags("--config", path, "--workers", "5"), env=env)
    assert config.workers == 5  # flag beats env beats file
    assert config.batch_size == 60  # env beats file
    assert config.idle_timeout == 8.5 and isinstance(config.idle_timeout, float)
    assert config.durability == "buffered"  # file beats default
    assert config.agents == ("a.b:C",) and config.entry_points is False
    assert config.max_active == 100_000  # default
    # the file alone
    only_file = load_config(flags("--config", path), env={})
    assert (only_file.workers, only_file.batch_size, only_file.idle_timeout) == (3, 50, 7.0)
    # overrides (the Python API) beat everything
    assert load_config(flags("--workers", "5"), env=env, overrides={"workers": 6}).workers == 6


def test_the_node_table_is_read(tmp_path: Path) -> None:
    path = toml(tmp_path, '[node]\nworkers = 2\nlisten = "tcp://127.0.0.1:0"\n')
    config = load_config(flags("--config", path), env={})
    assert config.workers == 2 and config.listen == "tcp://127.0.0.1:0"


def test_phoenix_config_env_names_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_restarts = 1\n")
    assert load_config(None, env={"PHOENIX_CONFIG": path}).max_restarts == 1
    other = toml(tmp_path, "max_restarts = 2\n", "other.toml")
    assert load_config(flags("--config", other), env={"PHOENIX_CONFIG": path}).max_restarts == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)],
)
def test_booleans_from_the_environment(raw: str, expected: bool) -> None:
    assert load_config(None, env={"PHOENIX_ENTRY_POINTS": raw}).entry_points is expected


def test_boolean_and_repeatable_flags() -> None:
    assert load_config(flags("--no-entry-points"), env={}).entry_points is False
    env = {"PHOENIX_ENTRY_POINTS": "false", "PHOENIX_AGENTS": "x.y:A, z:B ,"}
    assert load_config(flags("--entry-points"), env=env).entry_points is True
    assert load_config(None, env=env).agents == ("x.y:A", "z:B")
    config = load_config(flags("--agents", "m:A", "n:B", "--agents", "o:C"), env=env)
    assert config.agents == ("m:A", "n:B", "o:C")  # flags replace the environment's list


# --- bad values name their source --------------------------------------------------------------

BAD_ENV = [
    ("PHOENIX_WORKERS", "abc"),
    ("PHOENIX_WORKERS", "-1"),
    ("PHOENIX_WORKERS", "1.5"),
    ("PHOENIX_BATCH_SIZE", "0"),
    ("PHOENIX_DURABILITY", "fast"),
    ("PHOENIX_LISTEN", "tcp://127.0.0.1"),
    ("PHOENIX_LISTEN", "udp://127.0.0.1:1"),
    ("PHOENIX_ENTRY_POINTS", "maybe"),
    ("PHOENIX_IDLE_TIMEOUT", "0"),
    ("PHOENIX_HEARTBEAT_INTERVAL", "soon"),
    ("PHOENIX_LOG_LEVEL", "verbose"),
]


@pytest.mark.parametrize(("var", "value"), BAD_ENV)
def test_bad_environment_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={var: value})
    assert f"environment {var}" in str(info.value)


BAD_FLAGS = [
    ("--workers", "abc"),
    ("--workers", "-1"),
    ("--max-active", "0"),
    ("--listen", "tcp://127.0.0.1:99999"),
    ("--listen", "nowhere"),
    ("--restart-period", "0.01"),
    ("--drain-timeout", "-1"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_bad_flag_values_name_the_flag(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags(f"{flag}={value}"), env={})
    assert f"flag {flag}" in str(info.value)


def test_a_bad_choice_flag_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        flags("--durability", "fast")
    assert info.value.code == 2
    assert "--durability" in capsys.readouterr().err


BAD_FILES = {
    "non-int workers": 'workers = "x"',
    "float workers": "workers = 1.5",
    "bool workers": "workers = true",
    "negative workers": "workers = -2",
    "unknown durability": 'durability = "fast"',
    "bad endpoint": 'listen = "tcp://:1"',
    "bool for a float": "idle_timeout = true",
    "agents not strings": "agents = [1, 2]",
    "agents a table": "agents = {a = 1}",
    "unknown key": "wrokers = 2",
    "unknown key in [node]": "[node]\nwrokers = 2",
    "other table without [node]": "[cluster]\nseeds = []",
    "node not a table": "node = 5",
    "invalid TOML": "workers = = 2",
    "unterminated string": 'listen = "tcp://',
}


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_values_name_the_file(tmp_path: Path, text: str) -> None:
    path = toml(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(flags("--config", path), env={})
    assert path in str(info.value)


def test_an_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    path = toml(tmp_path, "wrokers = 2\n")
    with pytest.raises(ConfigError, match="'wrokers'") as info:
        load_config(flags("--config", path), env={})
    assert "workers" in str(info.value).partition("known:")[2]


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml") as info:
        load_config(flags("--config", missing), env={})
    assert "No such file" in str(info.value)
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(None, env={"PHOENIX_CONFIG": missing})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="'wrokers'"):
        load_config(None, env={}, overrides={"wrokers": 1})


@pytest.mark.parametrize("var", ["PHOENIX_IDLE_TIMEOUT", "PHOENIX_HEARTBEAT_TIMEOUT"])
def test_nan_is_refused(var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_config(None, env={var: "nan"})


def test_top_level_keys_are_not_silently_ignored_next_to_a_node_table(tmp_path: Path) -> None:
    path = toml(tmp_path, 'workers = 3\n[node]\ndurability = "buffered"\n')
    try:
        config = load_config(flags("--config", path), env={})
    except ConfigError as exc:
        assert path in str(exc)  # refusing the mix is fine too
        return
    assert config.workers == 3 and config.durability == "buffered"


# --- the command line ----------------------------------------------------------------------------


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phoenix_node", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "COLUMNS": "100", **(env or {})},
    )


@pytest.mark.timeout(30)
def test_run_help_lists_every_option_with_its_env_var() -> None:
    proc = run_cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "--config" in text
    for o in OPTIONS:
        assert o.flag in text, o.flag
        assert o.env in text, o.env
        if o.type is bool:
            assert "--no-" + o.flag[2:] in text


@pytest.mark.timeout(30)
def test_run_with_a_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_cli("run", "--data", str(tmp_path / "d"), env={"PHOENIX_WORKERS": "many"})
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "PHOENIX_WORKERS" in proc.stderr
    assert not (tmp_path / "d").exists(), "nothing may be created for a bad configuration"
