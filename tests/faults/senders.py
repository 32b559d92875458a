"""Environments of the sender processes the fault tests (and the soak) start."""

from __future__ import annotations

import base64
import os

from tests.conftest import common_env
from tests.email.email_helpers import email_env
from tests.push.fakes.tls import Pki

# Lean processes: warnings only, and one line per event in JSON (the tail is shown when a test fails).
_QUIET = {"BELFRY_LOG_LEVEL": "warning", "BELFRY_LOG_JSON": "true"}


def email_process_env(database_url: str, token_keys: dict[str, bytes], smtp_port: int, **extra: str) -> dict[str, str]:
    """The email sender's whole process environment: this one's, plus the service's settings (``extra`` wins)."""
    return {**os.environ, **_QUIET, **email_env(database_url, token_keys, smtp_port), **extra}


def webhooks_process_env(
    database_url: str, token_keys: dict[str, bytes], pki: Pki, port: int, **extra: str
) -> dict[str, str]:
    """The webhooks sender's process environment, allowed to reach a loopback peer on ``port``."""
    settings = common_env(
        database_url,
        token_keys,
        identity="webhooks",
        BELFRY_WEBHOOKS_ALLOWED_PORTS=str(port),
        BELFRY_WEBHOOKS_ALLOW_NETWORKS="127.0.0.0/8",
        BELFRY_WEBHOOKS_CA_FILE=str(pki.ca_file),
        BELFRY_WEBHOOK_SECRET_KEY=base64.b64encode(os.urandom(32)).decode(),
        **extra,
    )
    return {**os.environ, **_QUIET, **settings}
