"""Who may call which method: the allow-list of ``belfry.access``, enforced by real services.

The allow-list is checked against the generated descriptors of every Belfry
API. The calls go to the real preferences service and dispatcher, started
the way ``belfry serve`` starts them (their own settings and build, real
servers on port 0, a real PostgreSQL of this module's own), as callers that
prove their identity with a service token or a mesh client certificate.
Every refusal is also checked in the database: the handler never ran, so
nothing was written for the account the call named.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import belfry.api
import grpc
import pytest
from belfry import access, identity, rpc, service
from belfry.api.directory.v1 import directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.config import TlsSettings
from cryptography import x509
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.dispatcher.server import build_for as dispatcher_build
from services.dispatcher.settings import load_settings as dispatcher_settings
from services.preferences.server import build_for as preferences_build
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import MESH_KEY, client_tls, common_env, fresh_database, open_pool
from tests.deploy.pki import Authority
from tests.dispatcher.conftest import Mesh, event, refused, seed

# A producer bound to two accounts: it publishes for ACC_A; ACC_QUIET receives only calls that
# must be refused, so its tables stay empty; ACC_B is another tenant's, never its to publish for.
PRODUCER = "billing"
ACC_A, ACC_QUIET, ACC_B = (f"acc_{uuid.uuid4().hex[:12]}" for _ in range(3))
_CALL_TIMEOUT = 10.0  # a bound so a broken handshake fails the test instead of hanging it


# --- The allow-list against the APIs -------------------------------------------------------------


def _api_methods() -> dict[str, MethodDescriptor]:
    """Every method of every service declared by the generated ``belfry.api`` modules, by its gRPC path."""
    found: dict[str, MethodDescriptor] = {}
    for module in pkgutil.walk_packages(belfry.api.__path__, f"{belfry.api.__name__}."):
        if not module.name.endswith("_pb2"):
            continue
        for served in importlib.import_module(module.name).DESCRIPTOR.services_by_name.values():
            for method in served.methods:
                found[f"/{served.full_name}/{method.name}"] = method
    # Health and reflection are the kit's, admitted to anyone; they are not Belfry APIs.
    return {path: m for path, m in found.items() if not path.startswith(("/grpc.health", "/grpc.reflection"))}


def test_every_method_of_every_api_has_a_rule_and_every_rule_a_method() -> None:
    """Each method of each Belfry gRPC service has an entry in the allow-list, and no entry names a method that does not exist."""
    methods = _api_methods()
    # The walk must reach the APIs, or the comparison below would prove nothing.
    assert "/belfry.api.dispatcher.v1.DispatcherService/Publish" in methods
    assert "/belfry.api.webhooks.v1.Webhooks/ConnectWebhook" in methods
    assert sorted(set(methods) - set(access.RULES)) == [], "methods nobody may call (no rule)"
    assert sorted(set(access.RULES) - set(methods)) == [], "rules for methods that do not exist"


def test_every_caller_a_rule_names_is_a_role_or_a_belfry_service() -> None:
    """A rule names only the four roles and the declared services: a misspelt service would never be admitted."""
    known = set(access.ROLES) | {d.name for d in service.declared()}
    strangers = {path: sorted(rule.callers - known) for path, rule in access.RULES.items() if rule.callers - known}
    assert strangers == {}
    assert all(rule.callers for rule in access.RULES.values())


def _acting_for(descriptor: Descriptor, account: str, depth: int = 0) -> Message:
    """A request of ``descriptor`` whose every ``account_id`` (nested and repeated ones too) is ``account``."""
    request = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.name == "account_id" and field.type == FieldDescriptor.TYPE_STRING:
            setattr(request, field.name, account)
        elif field.message_type is not None and depth < 2 and not field.message_type.GetOptions().map_entry:
            inner = _acting_for(field.message_type, account, depth + 1)
            if field.is_repeated:
                getattr(request, field.name).add().CopyFrom(inner)
            else:
                getattr(request, field.name).CopyFrom(inner)
    return request


def test_every_method_a_producer_may_call_is_checked_for_the_account_the_request_acts_for() -> None:
    """A producer bound to some accounts is held to them on every method it may call: each such rule reads the account from its method's request."""
    methods = _api_methods()
    bound = {path: rule for path, rule in access.RULES.items() if access.PRODUCER in rule.callers}
    assert "/belfry.api.dispatcher.v1.DispatcherService/PublishStream" in bound
    unbound = sorted(path for path, rule in bound.items() if rule.accounts is None)
    assert unbound == [], "a bound producer could act for any account through these"
    for path, rule in bound.items():
        assert rule.accounts is not None
        request = _acting_for(methods[path].input_type, "acc_x")
        assert set(rule.accounts(request)) == {"acc_x"}, path


# --- Calls to the real dispatcher ----------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """The running preferences service and dispatcher, this module's database and the seeded mesh."""

    mesh: Mesh
    pool: asyncpg.Pool
    database_url: str
    dispatcher: str  # address
    preferences: str  # address


# The fan-out writes deliveries, which the senders of other areas would claim: this module has its own database.
@pytest.fixture(scope="module")
async def running(admin_dsn: str, token_keys: dict[str, bytes]) -> AsyncIterator[Running]:
    """Preferences and a dispatcher that admits ``billing`` as a producer for ACC_A and ACC_QUIET only."""
    async with fresh_database(admin_dsn) as url, open_pool(url) as pool:
        prefs_settings = preferences_settings(common_env(url, token_keys))
        prefs = await service.start("preferences", prefs_settings.common, preferences_build(prefs_settings))
        preferences = f"127.0.0.1:{prefs.port}"
        settings = dispatcher_settings(
            common_env(
                url,
                token_keys,
                identity="dispatcher",  # it calls preferences as itself
                BELFRY_PREFERENCES_ADDRESS=preferences,
                BELFRY_PRODUCERS=f"{PRODUCER}={ACC_A},{ACC_QUIET}",
            )
        )
        disp = await service.start("dispatcher", settings.common, dispatcher_build(settings))
        dispatcher = f"127.0.0.1:{disp.port}"
        prefs_channel = rpc.connect(preferences, client_tls())
        disp_channel = rpc.connect(dispatcher, client_tls(PRODUCER))
        try:
            mesh = Mesh(
                dispatcher=dispatcher_pb2_grpc.DispatcherServiceStub(disp_channel),
                directory=directory_pb2_grpc.DirectoryServiceStub(prefs_channel),
                preferences=preferences_pb2_grpc.PreferencesServiceStub(prefs_channel),
                pool=pool,
                dispatcher_port=disp.port,
                preferences_address=preferences,
                database_url=url,
            )
            for account in (ACC_A, ACC_QUIET, ACC_B):
                await seed(mesh, account)
            yield Running(mesh, pool, url, dispatcher, preferences)
        finally:
            await disp_channel.close()
            await prefs_channel.close()
            await disp.stop(0.1)
            await prefs.stop(0.1)


async def _written(pool: asyncpg.Pool, account_id: str) -> dict[str, int]:
    """Rows of ``account_id`` in every dispatcher table (found in the catalog, so new tables count too) and the queue."""
    tables = await pool.fetch(
        """select table_schema || '.' || table_name as name from information_schema.columns
           where column_name = 'account_id' and (table_schema = 'dispatcher' or
                 (table_schema = 'queue' and table_name = 'deliveries'))
           order by 1"""
    )
    counts = {}
    for row in tables:
        counts[row["name"]] = await pool.fetchval(
            f"select count(*) from {row['name']} where account_id = $1", account_id
        )
    return counts


async def _nothing_written(pool: asyncpg.Pool, account_id: str) -> None:
    counts = await _written(pool, account_id)
    # The catalog must list the tables a publish writes, or an empty answer would prove nothing.
    assert {"dispatcher.notifications", "dispatcher.fanout", "dispatcher.recipients", "queue.deliveries"} <= set(counts)
    assert {name: n for name, n in counts.items() if n} == {}


async def _kept(pool: asyncpg.Pool, account_id: str, keys: Sequence[str]) -> set[str]:
    """Which of the idempotency keys have a notification of ``account_id``."""
    rows = await pool.fetch(
        "select idempotency_key from dispatcher.notifications where account_id = $1 and idempotency_key = any($2)",
        account_id,
        list(keys),
    )
    return {r["idempotency_key"] for r in rows}


def _stub(channel: grpc.aio.Channel) -> dispatcher_pb2_grpc.DispatcherServiceStub:
    return dispatcher_pb2_grpc.DispatcherServiceStub(channel)


def _publish(account_id: str) -> pb.PublishRequest:
    return pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"]))


async def test_a_call_that_proves_no_identity_is_unauthenticated(running: Running) -> None:
    """Without a certificate or a valid service token, Publish answers UNAUTHENTICATED and writes nothing."""
    no_identity = TlsSettings(None, None, None)
    async with rpc.connect(running.dispatcher, no_identity) as channel:
        error = await refused(_stub(channel).Publish(_publish(ACC_QUIET)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # The message tells the caller where an identity goes.
    assert "'belfry-service-token'" in (error.details() or "")

    now = time.time()
    forged = {
        # Another Ed25519 key under the mesh key's own kid: only the signature gives it away.
        "same kid, another key": identity.SigningKey.generate(MESH_KEY.kid).mint(PRODUCER, ttl_seconds=600),
        "unknown kid": identity.SigningKey.generate("elsewhere").mint(PRODUCER, ttl_seconds=600),
        # Signed by the mesh key, but it ended an hour ago (far beyond the clock-skew leeway).
        "expired": MESH_KEY.mint(PRODUCER, ttl_seconds=60, now=now - 3600),
        "not a token": "not-a-token",
    }
    answers = {}
    for case, token in forged.items():
        async with rpc.connect(running.dispatcher, TlsSettings(None, None, None, token)) as channel:
            error = await refused(_stub(channel).Publish(_publish(ACC_QUIET)))
        answers[case] = (error.code(), error.details() or "")
    assert {case: code for case, (code, _) in answers.items()} == dict.fromkeys(forged, grpc.StatusCode.UNAUTHENTICATED)
    assert "signature verification failed" in answers["same kid, another key"][1].lower()
    assert "not signed by a known mesh key" in answers["unknown kid"][1]
    assert "expired" in answers["expired"][1]
    await _nothing_written(running.pool, ACC_QUIET)


async def test_an_identity_the_rule_does_not_name_is_denied_before_the_handler_runs(running: Running) -> None:
    """A valid identity that holds no role, one holding only other roles, and a Belfry service not named for Publish all get PERMISSION_DENIED, and nothing is written."""
    method = "/belfry.api.dispatcher.v1.DispatcherService/Publish"
    # nobody: configured nowhere; tests: provisioning, app and operator here, not a producer; email: a service.
    for caller in ("nobody", "tests", "email"):
        async with rpc.connect(running.dispatcher, client_tls(caller)) as channel:
            error = await refused(_stub(channel).Publish(_publish(ACC_QUIET)))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, caller
            assert error.details() == f"{caller} may not call {method}"
            # The batch form of the same method is refused alike: the caller, not the request, is the reason.
            batch = pb.PublishBatchRequest(events=[event(ACC_QUIET, recipient_user_ids=["ana"])])
            error = await refused(_stub(channel).PublishBatch(batch))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, caller
    await _nothing_written(running.pool, ACC_QUIET)


async def test_a_bound_producer_publishes_for_its_accounts_only(running: Running) -> None:
    """A producer bound to ACC_A publishes for it; an event for another account is PERMISSION_DENIED naming the account, and nothing is written for it."""
    stub = running.mesh.dispatcher  # presents billing's token
    mine = event(ACC_A, recipient_user_ids=["ana"])
    answer = await stub.Publish(pb.PublishRequest(event=mine))
    assert answer.notification_id
    assert await _kept(running.pool, ACC_A, [mine.idempotency_key]) == {mine.idempotency_key}

    error = await refused(stub.Publish(_publish(ACC_B)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == f"{PRODUCER} may not act for account {ACC_B!r}"
    await _nothing_written(running.pool, ACC_B)


async def test_a_batch_holding_another_accounts_event_is_refused_as_a_whole(running: Running) -> None:
    """PublishBatch mixing the producer's account and another is PERMISSION_DENIED, and neither event is written."""
    stub = running.mesh.dispatcher
    ours = [event(ACC_A, recipient_user_ids=["ana"]) for _ in range(2)]
    theirs = event(ACC_B, recipient_user_ids=["ana"])
    error = await refused(stub.PublishBatch(pb.PublishBatchRequest(events=[ours[0], theirs, ours[1]])))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ACC_B in (error.details() or "")
    assert await _kept(running.pool, ACC_A, [e.idempotency_key for e in ours]) == set()
    await _nothing_written(running.pool, ACC_B)

    # The same batch without the foreign event goes through: the refusal was the account's.
    statuses = (await stub.PublishBatch(pb.PublishBatchRequest(events=ours))).statuses
    assert [s.outcome for s in statuses] == [pb.OUTCOME_ACCEPTED] * 2
    assert await _kept(running.pool, ACC_A, [e.idempotency_key for e in ours]) == {e.idempotency_key for e in ours}


async def test_a_stream_ends_at_the_first_event_for_another_account(running: Running) -> None:
    """On PublishStream the events before a foreign account's are acknowledged and written; that event ends
    the stream with PERMISSION_DENIED naming the account, and neither it nor anything after it is written."""
    before = [event(ACC_A, recipient_user_ids=["ana"]) for _ in range(2)]
    foreign = event(ACC_B, recipient_user_ids=["ana"])
    after = event(ACC_A, recipient_user_ids=["ana"])

    async def requests() -> AsyncIterator[pb.PublishStreamRequest]:
        for sequence, ev in enumerate([*before, foreign, after], start=1):
            yield pb.PublishStreamRequest(sequence=sequence, event=ev)

    acks: list[pb.PublishStreamAck] = []

    async def read_every_ack() -> None:
        async for ack in running.mesh.dispatcher.PublishStream(requests(), timeout=_CALL_TIMEOUT):
            acks.append(ack)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_every_ack()
    # The kit checks each message as the dispatcher reads it: the refusal ends the call (it is not an ack).
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == f"{PRODUCER} may not act for account {ACC_B!r}"
    assert [(a.sequence, a.status.outcome) for a in acks] == [(1, pb.OUTCOME_ACCEPTED), (2, pb.OUTCOME_ACCEPTED)]
    assert await _kept(running.pool, ACC_A, [e.idempotency_key for e in before]) == {e.idempotency_key for e in before}
    assert await _kept(running.pool, ACC_A, [after.idempotency_key]) == set()
    await _nothing_written(running.pool, ACC_B)


# --- Mutual TLS: the certificate names the caller --------------------------------------------------


@dataclass(frozen=True)
class Secured:
    """Preferences served over mutual TLS, and the mesh CA that issues its callers' certificates."""

    address: str
    ca: Authority


@pytest.fixture(scope="module")
async def secured(
    running: Running, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Secured]:
    """The preferences service started from BELFRY_TLS_* settings, as in a pod, on this module's database."""
    folder: Path = tmp_path_factory.mktemp("access-pki")
    ca = Authority.create(folder, "mesh")
    own = ca.issue("preferences")
    assert own.cert and own.key and own.ca
    settings = preferences_settings(
        common_env(
            running.database_url,
            token_keys,
            BELFRY_TLS_CERT=str(own.cert),
            BELFRY_TLS_KEY=str(own.key),
            BELFRY_TLS_CA=str(own.ca),
        )
    )
    prefs = await service.start("preferences", settings.common, preferences_build(settings))
    try:
        yield Secured(f"127.0.0.1:{prefs.port}", ca)
    finally:
        await prefs.stop(0.1)


async def _unsubscribe(secured: Secured, tls: TlsSettings, user_id: str) -> grpc.aio.AioRpcError | None:
    """Unsubscribe (a method only the gateway may call) ``user_id`` of ACC_A from a topic's email; the error, if any."""
    async with rpc.connect(secured.address, tls, override_authority="localhost") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        request = preferences_pb2.UnsubscribeRequest(account_id=ACC_A, user_id=user_id, topic="deals.stage_changed")
        try:
            await stub.Unsubscribe(request, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


async def _email_choice(pool: asyncpg.Pool, user_id: str) -> bool | None:
    enabled: bool | None = await pool.fetchval(
        """select enabled from preferences.user_choices
           where account_id = $1 and user_id = $2 and topic = 'deals.stage_changed' and channel = 'email'""",
        ACC_A,
        user_id,
    )
    return enabled


async def test_a_certificate_naming_the_gateway_is_admitted_and_one_naming_an_unconfigured_caller_is_denied(
    running: Running, secured: Secured
) -> None:
    """Over mutual TLS the spiffe://belfry/<name> of the client certificate is the caller: the gateway may
    Unsubscribe a user, a certificate naming crm (configured nowhere) gets PERMISSION_DENIED and changes nothing."""
    error = await _unsubscribe(secured, secured.ca.issue("crm"), "ben")
    assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "crm may not call /belfry.api.preferences.v1.PreferencesService/Unsubscribe"
    assert await _email_choice(running.pool, "ben") is None

    # The certificate also carries DNS names (localhost first): the gateway is admitted by its spiffe name.
    assert await _unsubscribe(secured, secured.ca.issue("gateway"), "ben") is None
    assert await _email_choice(running.pool, "ben") is False


async def test_a_certificate_is_read_by_its_first_dns_name_when_it_has_no_spiffe_name(
    running: Running, secured: Secured
) -> None:
    """Without a spiffe:// name, the first label of the first DNS name is the caller (gateway.belfry.svc is the gateway)."""
    dns_only = secured.ca.leaf("gateway-dns", [x509.DNSName("gateway.belfry.svc"), x509.DNSName("crm")])
    assert await _unsubscribe(secured, dns_only, "chloe") is None
    assert await _email_choice(running.pool, "chloe") is False


async def test_a_certificate_naming_no_one_of_this_trust_domain_is_not_read_as_that_name(
    running: Running, secured: Secured
) -> None:
    """A spiffe name of another trust domain is not read as its last segment (nor its DNS name), two spiffe names are no name:
    both certificates, from the mesh CA, get UNAUTHENTICATED and change nothing."""
    foreign = secured.ca.leaf("foreign", [x509.UniformResourceIdentifier("spiffe://elsewhere/gateway")])
    # Another trust domain's certificate whose DNS name looks like ours: the DNS fallback is for certificates
    # without any SPIFFE ID, so it is not read as the gateway either.
    foreign_dns = secured.ca.leaf(
        "foreign-dns",
        [x509.UniformResourceIdentifier("spiffe://elsewhere/crm"), x509.DNSName("gateway.elsewhere.svc")],
    )
    lookalike = secured.ca.leaf("lookalike", [x509.UniformResourceIdentifier("spiffe://belfry.evil/gateway")])
    ambiguous = secured.ca.leaf(
        "ambiguous",
        [
            x509.UniformResourceIdentifier("spiffe://belfry/gateway"),
            x509.UniformResourceIdentifier("spiffe://belfry/crm"),
        ],
    )
    for tls in (foreign, foreign_dns, lookalike, ambiguous):
        error = await _unsubscribe(secured, tls, "dan")
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, tls.cert
        assert error.details() == "the client certificate names no identity (a spiffe:// URI or a DNS name)"
    assert await _email_choice(running.pool, "dan") is None
