"""Settings: parsed once, every problem reported at once."""

from __future__ import annotations

import pytest
from belfry.config import Env, load_common
from belfry.errors import ConfigError


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
