"""Settings: parsed once, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from belfry import cli
from belfry.config import Env, Recorder, load_common, parse_token_keys
from belfry.errors import ConfigError

from services.dispatcher.settings import load_settings as dispatcher_settings
from tests.conftest import common_env


def test_every_problem_is_reported_at_once() -> None:
    env = Env({"BELFRY_DB_POOL_MAX": "many", "BELFRY_DRAIN_SECONDS": "-1", "BELFRY_TOKEN_KEYS": "short=abc"})
    load_common("dispatcher", env, default_port=50052)
    with pytest.raises(ConfigError) as caught:
        env.check()
    message = caught.value.message
    assert "BELFRY_DATABASE_URL is required" in message or "DATABASE_URL" in message
    assert "BELFRY_DB_POOL_MAX must be an integer" in message
    assert "BELFRY_DRAIN_SECONDS must be at least 0" in message
    assert "at least 32 characters" in message


def test_valid_settings_and_defaults() -> None:
    secret = "s" * 40
    env = Env(
        {
            "BELFRY_DATABASE_URL": "postgresql://x/y",
            "BELFRY_TOKEN_KEYS": f"a={secret},b={secret}",
            "BELFRY_TOKEN_ACTIVE_KID": "b",
        }
    )
    common = load_common("email", env, default_port=50054)
    env.check()
    assert common.grpc_address == "[::]:50054"
    assert common.token_keys == {"a": secret.encode(), "b": secret.encode()}
    assert common.token_active_kid == "b"
    assert not common.tls.enabled


def test_active_kid_must_be_a_known_key() -> None:
    env = Env(
        {
            "BELFRY_DATABASE_URL": "postgresql://x/y",
            "BELFRY_TOKEN_KEYS": f"a={'s' * 40}",
            "BELFRY_TOKEN_ACTIVE_KID": "zz",
        }
    )
    load_common("email", env, default_port=1)
    with pytest.raises(ConfigError, match="'zz' is not one of the kids"):
        env.check()


def test_tls_paths_must_exist() -> None:
    env = Env({"BELFRY_DATABASE_URL": "postgresql://x/y", "BELFRY_TLS_CERT": "/nonexistent/cert.pem"})
    load_common("email", env, default_port=1)
    with pytest.raises(ConfigError, match=r"BELFRY_TLS_CERT points to '/nonexistent/cert\.pem'"):
        env.check()


def test_an_unknown_log_level_and_a_bad_metrics_address_are_reported_with_the_rest() -> None:
    env = Env({"BELFRY_LOG_LEVEL": "verbose", "BELFRY_METRICS_ADDRESS": "9464", "BELFRY_DB_POOL_MIN": "x"})
    load_common("email", env, default_port=1)
    with pytest.raises(ConfigError) as caught:
        env.check()
    message = caught.value.message
    assert "BELFRY_LOG_LEVEL must be one of debug, info, warning, error, critical, got 'verbose'" in message
    assert "BELFRY_METRICS_ADDRESS must be host:port" in message
    assert "BELFRY_DB_POOL_MIN must be an integer" in message


def test_log_level_is_case_insensitive_and_metrics_can_be_switched_off() -> None:
    env = Env({"DATABASE_URL": "postgresql://x/y", "BELFRY_LOG_LEVEL": "WARNING", "BELFRY_METRICS_ADDRESS": "off"})
    common = load_common("email", env, default_port=1)
    env.check()
    assert common.log_level == "warning"
    assert common.metrics_address == ""


def test_peer_and_health_addresses_are_checked_with_the_rest(token_keys: dict[str, bytes]) -> None:
    bad = {
        "BELFRY_HEALTH_ADDRESS": "localhost",
        "BELFRY_PREFERENCES_ADDRESS": "preferences",
    }
    with pytest.raises(ConfigError) as caught:
        dispatcher_settings(common_env("postgresql://x/y", token_keys, **bad))
    message = caught.value.message
    assert "BELFRY_HEALTH_ADDRESS must be host:port" in message and "'localhost'" in message
    assert "BELFRY_PREFERENCES_ADDRESS must be host:port" in message and "'preferences'" in message
    # What the manifests use passes: a resolver target, and the health port off when unset.
    good = dispatcher_settings(
        common_env("postgresql://x/y", token_keys, BELFRY_PREFERENCES_ADDRESS="dns:///preferences:50051")
    )
    assert good.preferences_address == "dns:///preferences:50051"
    assert good.common.health_address == ""


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("https://fcm.googleapis.com/", "https://fcm.googleapis.com"),
        ("https://localhost:8443", "https://localhost:8443"),
        ("http://fcm.googleapis.com", None),  # credentials go to it: TLS only
        ("fcm.googleapis.com", None),
        ("https://:443", None),
        ("https://localhost:99999", None),
    ],
)
def test_a_push_provider_endpoint_must_be_an_https_url(value: str, accepted: str | None) -> None:
    env = Env({"BELFRY_FCM_ENDPOINT": value})
    found = env.https_url("BELFRY_FCM_ENDPOINT", "https://fcm.googleapis.com")
    if accepted is None:
        with pytest.raises(ConfigError, match="BELFRY_FCM_ENDPOINT must be an https:// URL"):
            env.check()
    else:
        env.check()
        assert found == accepted


def test_database_url_is_read_from_the_given_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://process/env")
    monkeypatch.delenv("BELFRY_DATABASE_URL", raising=False)
    env = Env({"DATABASE_URL": "postgresql://given/env"})
    assert load_common("email", env, default_port=1).database_url == "postgresql://given/env"
    empty = Env({})
    load_common("email", empty, default_port=1)
    with pytest.raises(ConfigError, match=r"BELFRY_DATABASE_URL \(or DATABASE_URL\) is required"):
        empty.check()


def test_a_recorder_lists_every_variable_read_with_its_default() -> None:
    recorder = Recorder({"BELFRY_LOG_LEVEL": "debug"})
    load_common("email", Env(recorder), default_port=50054)
    assert recorder.reads["BELFRY_LOG_LEVEL"] == "info"
    assert recorder.reads["BELFRY_GRPC_ADDRESS"] == "[::]:50054"
    assert recorder.reads["BELFRY_LOG_JSON"] == "true"
    assert recorder.reads["BELFRY_DRAIN_SECONDS"] == "10"
    assert recorder.reads["BELFRY_TLS_CERT"] == ""


def _token_lifetime(token: str, keys: str) -> int:
    secret = parse_token_keys(keys)["k1"]
    claims = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_aud": False, "verify_iss": False})
    return int(claims["exp"]) - int(claims["iat"])


def test_belfry_token_lives_as_long_as_the_token_ttl_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = f"k1={'s' * 40}"
    monkeypatch.setenv("BELFRY_TOKEN_KEYS", keys)
    monkeypatch.setenv("BELFRY_TOKEN_ACTIVE_KID", "k1")
    monkeypatch.setenv("BELFRY_TOKEN_TTL_SECONDS", "1800")
    assert cli.main(["--home", str(tmp_path), "token", "--user", "ana"]) == 0
    assert _token_lifetime(capsys.readouterr().out.strip(), keys) == 1800
    assert cli.main(["--home", str(tmp_path), "token", "--user", "ana", "--ttl", "60"]) == 0
    assert _token_lifetime(capsys.readouterr().out.strip(), keys) == 60
    monkeypatch.setenv("BELFRY_TOKEN_TTL_SECONDS", "soon")
    assert cli.main(["--home", str(tmp_path), "token", "--user", "ana"]) == 2
    assert "BELFRY_TOKEN_TTL_SECONDS must be an integer" in capsys.readouterr().err
