"""The email service refuses a public URL that would make List-Unsubscribe links RFC 8058 forbids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from belfry.errors import ConfigError

from services.email.settings import load_settings
from tests.email.email_helpers import email_env


def _env(token_keys: dict[str, bytes], public_url: str) -> dict[str, str]:
    return {**email_env("postgresql://unused/db", token_keys, 25), "BELFRY_PUBLIC_URL": public_url}


REFUSED = [
    "http://notifications.example.com",
    "http://10.0.0.7:8080",
    "http://localhost.example.com",
    "ftp://notifications.example.com",
    "notifications.example.com",
    "https://",
]
ACCEPTED = [
    "https://notifications.example.com",
    "https://notifications.example.com/belfry/",
    "http://localhost:8080",
    "http://127.0.0.1:8080",
    "http://[::1]:8080",
    "http://belfry.localhost",
]


def test_only_https_or_a_loopback_development_url_is_accepted(token_keys: dict[str, bytes]) -> None:
    for url in REFUSED:
        with pytest.raises(ConfigError) as caught:
            load_settings(_env(token_keys, url))
        assert "BELFRY_PUBLIC_URL must be" in caught.value.message, url
        assert repr(url) in caught.value.message, url
    for url in ACCEPTED:
        assert load_settings(_env(token_keys, url)).public_url == url.rstrip("/")


def test_the_service_process_does_not_start_with_a_plain_http_public_url(token_keys: dict[str, bytes]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELFRY_")}
    env.update(_env(token_keys, "http://notifications.example.com"))
    done = subprocess.run(
        [sys.executable, "-m", "services.email"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "BELFRY_PUBLIC_URL must be https://" in done.stderr
    assert "RFC 8058" in done.stderr
