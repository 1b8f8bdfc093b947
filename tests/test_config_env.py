"""Configuration from the environment and the one rule for turning a listener off.

A ``JOULEGATE_*`` variable that is mistyped must not be ignored (the process would run on a default: the bills in a
local SQLite file); an error in a value must name the variable it came from. ``off`` or an empty value turns a
listener off, whether it comes from the TOML file, the environment or the flag, and the help says so in the same
words as the README.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from app.commands import meter as meter_command
from app.commands import serve as serve_command
from app.config import ENV_SETTINGS, LISTEN_HELP, Config, ConfigError, load_config

from .conftest import REPO_ROOT


def test_every_setting_has_a_variable_and_models_have_none() -> None:
    assert ENV_SETTINGS["JOULEGATE_DB__URL"] == ("db", "url")
    assert ENV_SETTINGS["JOULEGATE_METER__SOURCE"] == ("meter", "source")
    assert ENV_SETTINGS["JOULEGATE_SERVER__HTTP_LISTEN"] == ("server", "http_listen")
    sections = {p[0] for p in ENV_SETTINGS.values()}
    assert sections == set(Config.model_fields) - {"models"}
    for name, path in ENV_SETTINGS.items():
        if path[0] == "tls" and path[1] != "reload_interval_s":
            # TLS files go in pairs: one alone is honoured by being refused (a certificate without its key, ...)
            with pytest.raises(ConfigError, match="cert_path"):
                load_config(environ={name: "/etc/tls/x.pem"})
            continue
        cfg = load_config(environ={name: _sample_value(path)})  # each variable is honoured, none ignored
        assert cfg is not None


def _sample_value(path: tuple[str, ...]) -> str:
    section, key = path
    value = getattr(getattr(Config(), section), key)
    if value is None:
        return {
            "max_concurrent_requests": "7",
            "http_listen": "off",
            "grpc_listen": "off",
            "requests_per_minute": "60",
            "tokens_per_minute": "1000",
            "soft_wh": "10",
            "hard_wh": "20.5",
            "over_soft_class": "batch",
            "endpoint": "http://otel-collector:4317",
            "worker_metrics_listen": "127.0.0.1:9400",
        }[key]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or "x"
    return str(value)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("JOULEGATE_METER_SOURCE", "JOULEGATE_METER__SOURCE"),  # one underscore
        ("JOULEGATE_DB_URL", "JOULEGATE_DB__URL"),
        ("JOULEGATE_METER__SORUCE", "JOULEGATE_METER__SOURCE"),  # a typo in the key
        ("JOULEGATE_SERVER__NOPE", None),  # the separator says it is meant as a setting
        ("joulegate_db__url", None),  # case matters only to the shell; the error still names it
    ],
)
def test_a_mistyped_variable_is_an_error_naming_the_setting_it_resembles(name: str, hint: str | None) -> None:
    if name.islower():
        cfg = load_config(environ={name: "sqlite:///x.db"})  # not JOULEGATE_ (case-sensitive prefix): not ours
        assert cfg.db.url == "sqlite:///joulegate.db"
        return
    with pytest.raises(ConfigError) as err:
        load_config(environ={name: "sim"})
    message = str(err.value)
    assert message.startswith(f"{name}: not a joulegate setting")
    assert "JOULEGATE_<SECTION>__<KEY>" in message
    if hint:
        assert f"did you mean {hint}?" in message


def test_models_cannot_come_from_the_environment() -> None:
    with pytest.raises(
        ConfigError, match=r"JOULEGATE_MODELS__0__MODEL_ID: .*\[\[models\]\] are set in the config file"
    ):
        load_config(environ={"JOULEGATE_MODELS__0__MODEL_ID": "m"})


def test_an_unrelated_variable_is_a_warning_and_ignored() -> None:
    warnings: list[str] = []
    cfg = load_config(environ={"JOULEGATE_TEST_POSTGRES": "postgresql://x"}, warn=warnings.append)
    assert cfg == load_config(environ={})
    assert warnings == ["JOULEGATE_TEST_POSTGRES is not a joulegate setting; ignored"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("JOULEGATE_METER__SOURCE", "gpu", "meter.source: Input should be 'auto', 'nvml', 'sim' or 'none'"),
        ("JOULEGATE_SERVER__DRAIN_GRACE_S", "soon", "server.drain_grace_s: Input should be a valid number"),
        (
            "JOULEGATE_SERVER__HTTP_LISTEN",
            "8080",  # a number in TOML, but a text setting takes it as written
            f"server.http_listen: Value error, expected {LISTEN_HELP}, got '8080'",
        ),
        ("JOULEGATE_AUTH__REQUIRED", "maybe", "auth.required: Input should be a valid boolean"),
    ],
)
def test_a_bad_value_names_its_variable_and_the_expected_form(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={name: value})
    assert str(err.value).startswith(f"invalid configuration: {expected}")
    assert str(err.value).endswith(f"(from {name}={value!r})")


def test_a_bad_value_names_the_file_or_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "jg.toml"
    path.write_text('[meter]\nsource = "gpu"\n')
    with pytest.raises(ConfigError, match=re.escape(f"(from {path})")):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match=r"\(from the command line\)$"):
        load_config(environ={"JOULEGATE_METER__SOURCE": "sim"}, overrides={"meter": {"source": "gpu"}})


# -- listeners: one rule ---------------------------------------------------------------------------------------------


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(["--backend", "http://tgi:80", *argv])


def _meter_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    meter_command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("off", ["off", "", "OFF", " off "])
def test_off_or_empty_turns_a_listener_off_from_the_file_the_environment_and_the_flag(tmp_path: Path, off: str) -> None:
    path = tmp_path / "jg.toml"
    path.write_text(f'[server]\nhttp_listen = "{off}"\n[meter]\ngrpc_listen = "{off}"\n')
    from_file = load_config(path, environ={})
    from_env = load_config(
        environ={"JOULEGATE_SERVER__HTTP_LISTEN": off, "JOULEGATE_METER__GRPC_LISTEN": off}, warn=pytest.fail
    )
    from_flag = load_config(environ={}, overrides=serve_command.overrides_from_args(_serve_args("--http-listen", off)))
    meter_flag = load_config(environ={}, overrides=meter_command._overrides(_meter_args("--grpc-listen", off)))
    assert from_file.server.http_listen is None and from_file.meter.grpc_listen is None
    assert from_env.server.http_listen is None and from_env.meter.grpc_listen is None
    assert from_flag.server.http_listen is None
    assert meter_flag.meter.grpc_listen is None
    # and a flag that is not given leaves the default
    assert load_config(environ={}, overrides=serve_command.overrides_from_args(_serve_args())).server.http_listen == (
        "0.0.0.0:8080"
    )


def test_the_gateway_grpc_listener_cannot_be_turned_off() -> None:
    with pytest.raises(ConfigError, match="gRPC listener cannot be turned off"):
        load_config(environ={}, overrides=serve_command.overrides_from_args(_serve_args("--grpc-listen", "off")))


def test_help_and_readme_state_the_same_rule() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    serve_help = _help(serve_command)
    meter_help = _help(meter_command)
    assert LISTEN_HELP in serve_help and LISTEN_HELP in meter_help
    assert LISTEN_HELP in readme
    assert "disables" not in serve_help and "'off': do not" not in meter_help


def _help(module: object) -> str:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return " ".join(parser.format_help().split())
