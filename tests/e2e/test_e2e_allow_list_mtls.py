"""The allow-list over the whole running mesh, with real certificates: every caller against every method.

The same matrix as ``test_e2e_allow_list.py``, with mutual TLS in place of
service tokens. Every declared service runs as its own OS process (through
``belfry.local.supervisor.start_mesh``, one service at a time so each gets its
own environment) serving mutual TLS with a certificate of the mesh CA naming
it (``spiffe://belfry/<name>``); the services call one another with those
certificates, and no service-token key is configured anywhere, so a
certificate is the only way to prove an identity. Each caller (every
service's name, every configured identity, a stranger the CA certified but no
role names) calls each method once with an empty request, presenting a client
certificate naming it, and the answer is held to ``belfry.access.RULES``
exactly as the token matrix holds it. A certificate of another CA (naming the
gateway) is refused at the TLS handshake; a mesh-CA certificate of another
trust domain (``spiffe://elsewhere/gateway``) proves no identity. The
directory must hold afterwards exactly what it held before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import access, rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.config import TlsSettings
from belfry.local import demo, supervisor
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import every_service_env
from tests.deploy.pki import Authority
from tests.e2e.test_e2e_allow_list import (
    BOUND_ACCOUNT,
    CALL_TIMEOUT,
    CONCURRENCY,
    ROLE_ENV,
    ROLES,
    STRANGER,
    Served,
    Want,
    _answer,
    _directory,
    _expected,
    _mismatch,
    _pool_of,
    _raw,
    _serialize,
)

# No token can prove an identity here: the mesh's services hold no key to verify one, nor to mint one.
TOKEN_VARIABLES = ("BELFRY_SERVICE_TOKEN_KEYS", supervisor.SIGNING_KEY, "BELFRY_SERVICE_TOKEN")
NO_IDENTITY = "the client certificate names no identity (a spiffe:// URI or a DNS name)"
# Each channel keeps its own connections: no two callers' calls ever share a TLS session.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]


@dataclass
class Mesh:
    env: dict[str, str]
    children: list[supervisor.Child]
    addresses: dict[str, str]  # service name -> its gRPC address
    ca: Authority
    own: dict[str, TlsSettings]  # service name -> the certificate it serves and calls with


def _leaf(ca: Authority, label: str, names: list[x509.GeneralName]) -> TlsSettings:
    """A client certificate from ``ca`` carrying exactly ``names`` as its subject alternative names."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = ca.folder / f"client-{label}.crt", ca.folder / f"client-{label}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsSettings(cert_path, key_path, ca.ca_path)


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """Every declared service as its own process serving mutual TLS with its own certificate; roles and reflection on."""
    home: Path = tmp_path_factory.mktemp("allow-list-mtls")
    ca = Authority.create(home / "pki", "mesh")
    env = dict(os.environ)
    # SMTP points at a closed port: the one email the last step queues is never sent (its retries are not awaited).
    env.update(every_service_env(database_url, token_keys, home))
    env.update(ROLE_ENV, BELFRY_GRPC_REFLECTION="true")
    for variable in TOKEN_VARIABLES:
        env.pop(variable, None)
    own: dict[str, TlsSettings] = {}
    children: list[supervisor.Child] = []
    try:
        # In dependency order, as start_mesh would; each service's environment names its own certificate
        # and the addresses of those already up.
        for declared in service.declared():
            name = declared.name
            own[name] = ca.issue(name)
            child_env = dict(
                env,
                BELFRY_TLS_CERT=str(own[name].cert),
                BELFRY_TLS_KEY=str(own[name].key),
                BELFRY_TLS_CA=str(own[name].ca),
                **{f"BELFRY_{name.upper()}_GRPC_ADDRESS": "127.0.0.1:0"},
            )
            children += await supervisor.start_mesh(child_env, [name])
            env[f"BELFRY_{name.upper()}_ADDRESS"] = child_env[f"BELFRY_{name.upper()}_ADDRESS"]
        addresses = {d.name: env[f"BELFRY_{d.name.upper()}_ADDRESS"] for d in service.declared()}
        yield Mesh(env, children, addresses, ca, own)
    finally:
        await supervisor.stop_all(children, 15)


# --- What the running servers serve --------------------------------------------------------------


def _secure(address: str, tls: TlsSettings) -> grpc.aio.Channel:
    """A channel of its own to ``address`` presenting ``tls``'s certificate (and trusting its CA)."""
    credentials = rpc.channel_credentials(tls)
    assert credentials is not None, tls
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


async def _reflect(address: str, tls: TlsSettings) -> tuple[list[str], dict[str, descriptor_pb2.FileDescriptorProto]]:
    """The services a server lists through reflection (over mutual TLS), and the files that declare them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    async with _secure(address, tls) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=CALL_TIMEOUT)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        names = [s.name for s in listed.list_services_response.service]
        for name in names:
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            answer = await call.read()
            assert answer.WhichOneof("message_response") == "file_descriptor_response", (address, name, answer)
            for raw in answer.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
        await call.done_writing()
    return names, files


async def _served(mesh: Mesh, tls: TlsSettings) -> list[Served]:
    """Every method each running service answers (health and reflection are the kit's, open to all)."""
    found: list[Served] = []
    for server, address in mesh.addresses.items():
        names, files = await _reflect(address, tls)
        assert "grpc.health.v1.Health" in names, f"{server} at {address} does not list health: reflection is off?"
        pool = _pool_of(files)
        for name in names:
            if name.startswith("grpc."):
                continue
            for method in pool.FindServiceByName(name).methods:
                found.append(Served(f"/{name}/{method.name}", server, address, method))
    return found


# --- The callers and their calls -------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who calls: a label for the report, the identity the gate must read (None: none), the certificate presented."""

    label: str
    name: str | None
    tls: TlsSettings
    handshake: bool = True  # False: the server must refuse the certificate during the TLS handshake


def _answer_streamed(address: str, served: Served, request: Message, tls: TlsSettings) -> tuple[grpc.StatusCode, str]:
    """Call ``served`` (a request stream) with one message, then close: the status, or OK once a first answer arrived.

    Blocking, through the sync client, for the reason ``test_e2e_allow_list._answer_streamed`` gives (grpc/grpc#36066).
    """
    credentials = rpc.channel_credentials(tls)
    assert credentials is not None, tls
    with grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) as channel:
        kind = channel.stream_stream if served.method.server_streaming else channel.stream_unary
        multicallable = kind(served.path, request_serializer=_serialize, response_deserializer=_raw)
        call = None
        try:
            if not served.method.server_streaming:
                multicallable(iter([request]), timeout=CALL_TIMEOUT)
                return grpc.StatusCode.OK, ""
            call = multicallable(iter([request]), timeout=CALL_TIMEOUT)
            next(call)
            call.cancel()
            return grpc.StatusCode.OK, "(a first answer)"
        except StopIteration:
            assert call is not None
            return call.code(), call.details() or ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""


@dataclass
class Matrix:
    rows: int = 0
    wanted: dict[str, int] = field(default_factory=dict)
    admitted_callers: set[str] = field(default_factory=set)
    mismatches: list[str] = field(default_factory=list)


async def _run_matrix(served: list[Served], callers: list[Caller]) -> Matrix:
    matrix = Matrix()
    channels: dict[tuple[str, str], grpc.aio.Channel] = {}
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(row: Served, caller: Caller) -> None:
        request = GetMessageClass(row.method.input_type)()
        want, account = _expected(caller.name, access.RULES.get(row.path), request)
        wanted = want.value if caller.handshake else "UNAVAILABLE (TLS handshake refused)"
        async with limit:
            if row.method.client_streaming:
                code, details = await asyncio.to_thread(_answer_streamed, row.address, row, request, caller.tls)
            else:
                key = (caller.label, row.address)
                if key not in channels:
                    channels[key] = _secure(row.address, caller.tls)
                code, details = await _answer(channels[key], row, request)
        matrix.rows += 1
        matrix.wanted[wanted] = matrix.wanted.get(wanted, 0) + 1
        if not caller.handshake:
            wrong = code != grpc.StatusCode.UNAVAILABLE
        elif want is Want.UNAUTHENTICATED:
            wrong = not (code == grpc.StatusCode.UNAUTHENTICATED and details == NO_IDENTITY)
        else:
            wrong = _mismatch(want, account, caller.name, row.path, code, details)
            if want is Want.ADMITTED and caller.name is not None:
                matrix.admitted_callers.add(caller.name)
        if wrong:
            matrix.mismatches.append(
                f"{row.path} on {row.server} as {caller.label}: wanted {wanted}, got {code.name} {details!r}"
            )

    try:
        await asyncio.gather(*(one(row, caller) for row in served for caller in callers))
    finally:
        for channel in channels.values():
            await channel.close()
    matrix.mismatches.sort()
    return matrix


async def _seed(mesh: Mesh, tls: TlsSettings) -> None:
    """The bound producer's account and one user, written by the provisioning identity over mutual TLS."""
    async with _secure(mesh.addresses["preferences"], tls) as channel:
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        account = directory_pb2.Account(account_id=BOUND_ACCOUNT, name="Bound", tier=directory_pb2.TIER_STARTER)
        await directory.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account), timeout=CALL_TIMEOUT)
        user = directory_pb2.User(
            account_id=BOUND_ACCOUNT,
            user_id="ada",
            email="ada@example.test",
            display_name="Ada",
            locale="en",
            time_zone="UTC",
            permission_set="sales",
            active=True,
        )
        await directory.UpsertUser(directory_pb2.UpsertUserRequest(user=user), timeout=CALL_TIMEOUT)


# --- The test --------------------------------------------------------------------------------------


async def test_every_certified_caller_against_every_method_of_the_running_mesh(
    mesh: Mesh, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    declared = [d.name for d in service.declared()]
    assert {c.name for c in mesh.children} == set(declared)
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"
    for child in mesh.children:
        # Each process serves (and calls its peers) with its own certificate, and holds no token.
        assert child.env["BELFRY_TLS_CERT"] == str(mesh.own[child.name].cert), child.name
        assert not set(TOKEN_VARIABLES) & set(child.env), child.name

    certified: dict[str, TlsSettings] = {name: mesh.ca.issue(name) for name in [*ROLES, STRANGER]}
    served = await _served(mesh, certified[STRANGER])  # reflection is open to any certified caller
    servers_of: dict[str, set[str]] = {}
    for row in served:
        servers_of.setdefault(row.path, set()).add(row.server)
    assert sorted(set(access.RULES) - set(servers_of)) == [], "rules for methods no running service serves"

    await _seed(mesh, certified["sync"])
    before = await _directory(pool)
    assert {"accounts", "users"} <= set(before), "the directory tables were not found"
    assert any(BOUND_ACCOUNT in row for row in before["accounts"]), "the seeded account is not in the snapshot"
    assert any("'ada'" in row for row in before["users"]), "the seeded user is not in the snapshot"

    foreign = Authority.create(mesh.ca.folder, "foreign").issue("gateway")
    callers = [
        *(Caller(name, name, mesh.ca.issue(name)) for name in declared),
        *(Caller(name, name, certified[name]) for name in [*ROLES, STRANGER]),
        # The gateway as another CA certifies it; the client trusts the mesh CA, so only the server can refuse.
        Caller("gateway (foreign CA)", "gateway", TlsSettings(foreign.cert, foreign.key, mesh.ca.ca_path), False),
        Caller(
            "spiffe://elsewhere/gateway",
            None,
            _leaf(mesh.ca, "elsewhere", [x509.UniformResourceIdentifier("spiffe://elsewhere/gateway")]),
        ),
    ]
    assert len({c.label for c in callers}) == len(callers), "a configured identity shares a service's name"
    matrix = await _run_matrix(served, callers)

    after = await _directory(pool)
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"

    assert matrix.rows == len(served) * len(callers)
    # The table exercised every kind of answer and every configured identity got in somewhere.
    assert set(matrix.wanted) == {w.value for w in Want} | {"UNAVAILABLE (TLS handshake refused)"}, matrix.wanted
    assert set(ROLES) <= matrix.admitted_callers, matrix.admitted_callers
    # The empty requests wrote nothing: no row appeared, changed or went in the preferences schema.
    changed = [
        f"preferences.{table}: {verb} {row}"
        for table in sorted(set(before) | set(after))
        for verb, rows in (
            ("written", after.get(table, set()) - before.get(table, set())),
            ("changed or removed", before.get(table, set()) - after.get(table, set())),
        )
        for row in sorted(rows)
    ]
    problems = [*matrix.mismatches, *changed]
    assert problems == [], (
        f"{len(matrix.mismatches)} of {matrix.rows} calls answered wrongly, {len(changed)} directory rows differ:\n"
        + "\n".join(problems)
    )

    # The services call one another with their own certificates: the dispatcher admits a publish only after asking
    # preferences (EffectiveBatch, which only the dispatcher and batching may call) whether the topic exists.
    async with _secure(mesh.addresses["dispatcher"], certified["producer-bound"]) as channel:
        event = demo.event(account_id=BOUND_ACCOUNT, topic="comments.mentioned", recipients=["ada"], actor="ada")
        published = await dispatcher_pb2_grpc.DispatcherServiceStub(channel).Publish(
            dispatcher_pb2.PublishRequest(event=event), timeout=CALL_TIMEOUT
        )
    assert published.notification_id and not published.replayed
