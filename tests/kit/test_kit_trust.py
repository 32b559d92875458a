"""Whom a service trusts is checked when its settings are read: a service that would refuse every caller,
or admit the wrong ones, does not start.

Each case runs a real service's settings loader (the dispatcher's
``load_settings``, which ``belfry serve`` runs before anything else) over an
environment built for the test, and reads the problems it reports the way an
operator does: one ConfigError listing every problem, one per line.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest
from belfry import identity, service
from belfry.errors import ConfigError

from services.dispatcher.settings import Settings, load_settings
from tests.conftest import MESH_KEY, common_env, every_service_env, service_token
from tests.deploy.pki import Authority

_DATABASE = "postgresql://belfry@127.0.0.1:5432/never_connected"  # the loader only reads it
_HEAD = "invalid configuration:\n  - "


def _problems(environ: dict[str, str]) -> list[str]:
    """The problems the dispatcher's loader refuses ``environ`` for, one per entry."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    message = caught.value.message
    assert message.startswith(_HEAD)
    return message.removeprefix(_HEAD).split("\n  - ")


@pytest.fixture
def local(token_keys: dict[str, bytes]) -> dict[str, str]:
    """A local run's environment (HS256 user tokens, service tokens, every role held by ``tests``): it loads."""
    return common_env(_DATABASE, token_keys, identity="dispatcher")


@pytest.fixture
def production(local: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A production environment that loads: mutual TLS, the identity provider, no HS256 keys."""
    own = Authority.create(tmp_path, "mesh").issue("dispatcher")
    environ = {k: v for k, v in local.items() if k not in {"BELFRY_TOKEN_KEYS", "BELFRY_TOKEN_ACTIVE_KID"}}
    environ.update(
        BELFRY_PRODUCTION="true",
        BELFRY_TLS_CERT=str(own.cert),
        BELFRY_TLS_KEY=str(own.key),
        BELFRY_TLS_CA=str(own.ca),
        BELFRY_OIDC_ISSUER="https://id.example.test",
        BELFRY_OIDC_AUDIENCE="belfry",
    )
    return environ


def test_the_environments_the_refusals_start_from_load(local: dict[str, str], production: dict[str, str]) -> None:
    """The two starting points are valid, so each refusal below is caused by the one change it makes."""
    settings: Settings = load_settings(local)
    assert not settings.common.production and settings.common.token_keys
    assert settings.common.mesh.callers.producers == {"tests": None}
    settings = load_settings(production)
    assert settings.common.production and not settings.common.token_keys
    assert settings.common.user_tokens.oidc is not None
    assert settings.common.user_tokens.oidc.issuer == "https://id.example.test"


def test_production_refuses_hs256_user_token_keys(production: dict[str, str], local: dict[str, str]) -> None:
    """In production, BELFRY_TOKEN_KEYS (HS256 user tokens) is refused and the message points to the identity provider."""
    production["BELFRY_TOKEN_KEYS"] = local["BELFRY_TOKEN_KEYS"]
    assert _problems(production) == [
        "BELFRY_TOKEN_KEYS (HS256 user tokens) is for local runs only; "
        "in production user tokens come from the identity provider (BELFRY_OIDC_ISSUER)"
    ]


def test_production_needs_the_identity_provider(production: dict[str, str]) -> None:
    """In production, user tokens must come from OIDC: without BELFRY_OIDC_ISSUER and _AUDIENCE the service does not start."""
    del production["BELFRY_OIDC_ISSUER"], production["BELFRY_OIDC_AUDIENCE"]
    assert _problems(production) == [
        "BELFRY_PRODUCTION=true needs the identity provider: BELFRY_OIDC_ISSUER and BELFRY_OIDC_AUDIENCE"
    ]


def test_production_needs_an_https_identity_provider(production: dict[str, str]) -> None:
    """In production the identity provider's keys are fetched over https only."""
    production["BELFRY_OIDC_ISSUER"] = "http://id.example.test"
    assert _problems(production) == ["BELFRY_OIDC_ISSUER must be an https URL, got 'http://id.example.test'"]


@pytest.mark.parametrize("named", ["email", "crm"])
def test_a_service_token_naming_someone_else_is_refused_at_start(local: dict[str, str], named: str) -> None:
    """The dispatcher does not start with a BELFRY_SERVICE_TOKEN for another name: every peer would take it for that caller."""
    local["BELFRY_SERVICE_TOKEN"] = service_token(named)
    assert _problems(local) == [f"BELFRY_SERVICE_TOKEN names {named!r}, but this is the dispatcher service"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        # Another Ed25519 key under the mesh key's kid: the signature does not verify.
        pytest.param(
            identity.SigningKey.generate(MESH_KEY.kid).mint("dispatcher", ttl_seconds=600),
            "the service token is invalid: Signature verification failed",
            id="forged",
        ),
        pytest.param(
            identity.SigningKey.generate("retired").mint("dispatcher", ttl_seconds=600),
            "the service token was not signed by a known mesh key",
            id="unknown-key",
        ),
        pytest.param(
            MESH_KEY.mint("dispatcher", ttl_seconds=60, now=time.time() - 3600),
            "the service token is invalid: Signature has expired",
            id="expired",
        ),
    ],
)
def test_a_service_token_that_does_not_verify_is_refused_at_start(
    local: dict[str, str], token: str, reason: str
) -> None:
    """A BELFRY_SERVICE_TOKEN that the mesh keys do not verify (forged, from an unknown key, expired) stops the service, saying why."""
    local["BELFRY_SERVICE_TOKEN"] = token
    expected = f"BELFRY_SERVICE_TOKEN does not verify against BELFRY_SERVICE_TOKEN_KEYS: {reason}"
    assert _problems(local) == [expected]


@pytest.mark.parametrize(
    ("raw", "entry"),
    [
        ("crm", "crm"),  # no accounts at all
        ("crm=", "crm="),  # an empty account list
        ("crm= , ", "crm= ,"),  # only blanks
        ("=acc_1", "=acc_1"),  # no identity
        ("CRM=*", "CRM=*"),  # not an identity name (lower case only)
        ("crm=*;billing", "billing"),  # the second entry is the bad one
    ],
)
def test_malformed_producers_are_refused_naming_the_variable_and_the_entry(
    local: dict[str, str], raw: str, entry: str
) -> None:
    """BELFRY_PRODUCERS entries are identity=* or identity=account,...: anything else is refused, naming the entry."""
    local["BELFRY_PRODUCERS"] = raw
    assert _problems(local) == [f"BELFRY_PRODUCERS: {entry!r} is not identity=* or identity=account,account"]


def test_producers_bind_identities_to_all_or_listed_accounts(local: dict[str, str]) -> None:
    """BELFRY_PRODUCERS="crm=*;billing=acc_1,acc_2" lets crm act for every account and billing for its two."""
    local["BELFRY_PRODUCERS"] = "crm=*; billing = acc_1, acc_2"
    callers = load_settings(local).common.mesh.callers
    assert callers.producers == {"crm": None, "billing": frozenset({"acc_1", "acc_2"})}
    assert callers.roles("billing") == {"producer"}


@pytest.mark.parametrize("variable", ["BELFRY_PROVISIONING", "BELFRY_APPS", "BELFRY_OPERATORS"])
def test_malformed_role_names_are_refused_naming_the_variable(local: dict[str, str], variable: str) -> None:
    """Role members are identity names (lower case, digits, - _ .): one that is not is refused, naming the variable."""
    local[variable] = "ops, Crm Sync"
    assert _problems(local) == [f"{variable}: not identity names: Crm Sync"]


@pytest.mark.parametrize(
    ("variable", "raw", "taken"),
    [
        ("BELFRY_PRODUCERS", "dispatcher=*", "dispatcher"),
        ("BELFRY_PRODUCERS", "producer=acc_1", "producer"),
        ("BELFRY_PROVISIONING", "preferences", "preferences"),
        ("BELFRY_APPS", "gateway", "gateway"),
        ("BELFRY_OPERATORS", "ops,operator", "operator"),
    ],
)
def test_a_configured_identity_named_like_a_service_or_a_role_is_refused(
    local: dict[str, str], variable: str, raw: str, taken: str
) -> None:
    """A configured caller may not be called like a Belfry service (it would hold that service's rights) or a role."""
    local[variable] = raw
    assert _problems(local) == [f"configured caller identities may not be named like a service or a role: {taken}"]


def test_every_service_loads_a_production_environment(
    production: dict[str, str], token_keys: dict[str, bytes], tmp_path: Path
) -> None:
    """No service insists on the HS256 keys production refuses (the gateway once did, so it could not start)."""
    everything = every_service_env(_DATABASE, token_keys, tmp_path)  # what each service needs besides the rest
    base = everything | {k: v for k, v in production.items() if k != "BELFRY_SERVICE_TOKEN"}
    base = {k: v for k, v in base.items() if k not in {"BELFRY_TOKEN_KEYS", "BELFRY_TOKEN_ACTIVE_KID"}}
    for declared in service.declared():
        module = importlib.import_module(f"{declared.package}.settings")
        try:
            settings = module.load_settings(base)
        except ConfigError as exc:
            pytest.fail(f"{declared.name} refuses a production environment: {exc}")
        assert settings.common.production and not settings.common.token_keys, declared.name
