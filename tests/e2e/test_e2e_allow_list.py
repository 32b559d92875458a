"""The allow-list over the whole running mesh: every caller identity against every method.

Every declared service runs as its own OS process under the supervisor of
``belfry up`` (ports bound to 0, gRPC reflection on), on a database of this
module's own. Which service serves which method is read from the running
servers themselves (reflection lists their services and hands over the
descriptors the empty requests are built from), so nothing here is a list
that could go stale. Each caller (every service's own name, one identity per
configured role, a stranger with a valid token and no role, and no identity at
all) calls each method once with an empty request, and the answer is held to
``belfry.access.RULES``: refused callers get the gate's PERMISSION_DENIED, a
producer bound to other accounts gets the account refusal, allowed callers get
past the gate. The directory must hold afterwards exactly what it held before.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import access, identity, rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.local import supervisor
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import every_service_env

BOUND_ACCOUNT = "acc_bound"
# The configured identities, the roles each holds, and (for producers) the accounts it may act for (None: all).
ROLES: dict[str, frozenset[str]] = {
    "producer-all": frozenset({access.PRODUCER}),
    "producer-bound": frozenset({access.PRODUCER}),
    "sync": frozenset({access.PROVISIONING}),
    "app-web": frozenset({access.APP}),
    "ops": frozenset({access.OPERATOR}),
}
BINDINGS: dict[str, frozenset[str] | None] = {"producer-all": None, "producer-bound": frozenset({BOUND_ACCOUNT})}
STRANGER = "stranger"  # a valid token, no role
ROLE_ENV = {
    "BELFRY_PRODUCERS": ";".join(f"{name}={','.join(sorted(acc)) if acc else '*'}" for name, acc in BINDINGS.items()),
    "BELFRY_PROVISIONING": ",".join(n for n, r in ROLES.items() if access.PROVISIONING in r),
    "BELFRY_APPS": ",".join(n for n, r in ROLES.items() if access.APP in r),
    "BELFRY_OPERATORS": ",".join(n for n, r in ROLES.items() if access.OPERATOR in r),
}
CALL_TIMEOUT = 10.0  # a bound so a call that hangs fails its row instead of the whole run
CONCURRENCY = 8  # the machine is shared: a few calls in flight at a time


@dataclass
class Mesh:
    env: dict[str, str]
    children: list[supervisor.Child]
    addresses: dict[str, str]  # service name -> its gRPC address


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """Every declared service as its own process, with the roles above and reflection on."""
    home: Path = tmp_path_factory.mktemp("allow-list")
    env = dict(os.environ)
    env.update(every_service_env(database_url, token_keys, home))  # nothing is queued: SMTP is never reached
    env.update(ROLE_ENV, BELFRY_GRPC_REFLECTION="true")
    for declared in service.declared():
        env[f"BELFRY_{declared.name.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    children = await supervisor.start_mesh(env)
    try:
        addresses = {d.name: env[f"BELFRY_{d.name.upper()}_ADDRESS"] for d in service.declared()}
        yield Mesh(env, children, addresses)
    finally:
        await supervisor.stop_all(children, 15)


# --- What the running servers serve --------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One method as one running service serves it."""

    path: str  # /package.Service/Method
    server: str  # the declared service whose process answers it
    address: str
    method: MethodDescriptor


async def _reflect(address: str) -> tuple[list[str], dict[str, descriptor_pb2.FileDescriptorProto]]:
    """The services a server lists through reflection, and the files (with dependencies) that declare them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    async with grpc.aio.insecure_channel(address) as channel:
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


def _pool_of(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding ``files``, each added after its dependencies."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in sorted(files):
        add(name)
    return pool


async def _served(mesh: Mesh) -> list[Served]:
    """Every method each running service answers (health and reflection are the kit's, open to all)."""
    found: list[Served] = []
    for server, address in mesh.addresses.items():
        names, files = await _reflect(address)
        assert "grpc.health.v1.Health" in names, f"{server} at {address} does not list health: reflection is off?"
        pool = _pool_of(files)
        for name in names:
            if name.startswith("grpc."):
                continue
            for method in pool.FindServiceByName(name).methods:
                found.append(Served(f"/{name}/{method.name}", server, address, method))
    return found


# --- Who may call what, by the rules ---------------------------------------------------------------


class Want(enum.Enum):
    ADMITTED = "past the gate"
    REFUSED = "PERMISSION_DENIED '<caller> may not call <method>'"
    UNBOUND = "PERMISSION_DENIED '<caller> may not act for account ...'"
    UNAUTHENTICATED = "UNAUTHENTICATED"


def _expected(caller: str | None, rule: access.Rule | None, request: Message) -> tuple[Want, str]:
    """What ``caller`` (None: no identity) must get for ``request``, and the exact refusal account when unbound."""
    if caller is None:
        return Want.UNAUTHENTICATED, ""
    if rule is None:  # served but not in the allow-list: nobody may call it
        return Want.REFUSED, ""
    if caller in rule.callers:
        return Want.ADMITTED, ""
    held = ROLES.get(caller, frozenset()) & rule.callers
    if not held:
        return Want.REFUSED, ""
    binding = BINDINGS.get(caller)
    if held == {access.PRODUCER} and binding is not None and rule.accounts is not None:
        outside = sorted(set(rule.accounts(request)) - binding)
        if outside:
            return Want.UNBOUND, outside[0]
    return Want.ADMITTED, ""


def _mismatch(want: Want, account: str, caller: str | None, path: str, code: grpc.StatusCode, details: str) -> bool:
    refused_by_gate = code == grpc.StatusCode.PERMISSION_DENIED and "may not call" in details
    refused_for_account = code == grpc.StatusCode.PERMISSION_DENIED and "may not act for account" in details
    match want:
        case Want.UNAUTHENTICATED:
            return bool(code != grpc.StatusCode.UNAUTHENTICATED)
        case Want.REFUSED:
            return not (code == grpc.StatusCode.PERMISSION_DENIED and details == f"{caller} may not call {path}")
        case Want.UNBOUND:
            return not (
                code == grpc.StatusCode.PERMISSION_DENIED and details == f"{caller} may not act for account {account!r}"
            )
        case Want.ADMITTED:
            return refused_by_gate or refused_for_account


# --- The calls -------------------------------------------------------------------------------------


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _raw(data: bytes) -> bytes:
    return data


async def _answer(channel: grpc.aio.Channel, served: Served, request: Message) -> tuple[grpc.StatusCode, str]:
    """Call ``served`` (a unary request) once: the status, or OK once a first answer arrived."""
    kind = channel.unary_stream if served.method.server_streaming else channel.unary_unary
    multicallable = kind(served.path, request_serializer=_serialize, response_deserializer=_raw)
    try:
        if not served.method.server_streaming:
            await multicallable(request, timeout=CALL_TIMEOUT)
            return grpc.StatusCode.OK, ""
        call = multicallable(request, timeout=CALL_TIMEOUT)
        if await call.read() is grpc.aio.EOF:
            return await call.code(), await call.details() or ""
        call.cancel()
        return grpc.StatusCode.OK, "(a first answer)"
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


def _answer_streamed(address: str, served: Served, request: Message, token: str | None) -> tuple[grpc.StatusCode, str]:
    """Call ``served`` (a request stream) with one message, then close: the status, or OK once a first answer arrived.

    Blocking, through the sync client: when a server ends a call before reading (the gate's refusal), a
    grpc.aio client whose request write loses that race reports INTERNAL "Internal error from Core" instead of
    the server's status (grpc/grpc#36066, still so in grpcio 1.85); the sync client reports the server's status.
    """
    metadata = () if token is None else ((identity.METADATA_KEY, token),)
    with grpc.insecure_channel(address) as channel:
        kind = channel.stream_stream if served.method.server_streaming else channel.stream_unary
        multicallable = kind(served.path, request_serializer=_serialize, response_deserializer=_raw)
        call = None
        try:
            if not served.method.server_streaming:
                multicallable(iter([request]), timeout=CALL_TIMEOUT, metadata=metadata)
                return grpc.StatusCode.OK, ""
            call = multicallable(iter([request]), timeout=CALL_TIMEOUT, metadata=metadata)
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
    wanted: dict[Want, int] = field(default_factory=dict)
    admitted_callers: set[str] = field(default_factory=set)
    mismatches: list[str] = field(default_factory=list)


class Clients:
    """Each caller's service token, and one channel per (caller, address) presenting it; None: no identity at all."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._open: dict[tuple[str | None, str], grpc.aio.Channel] = {}

    def token(self, caller: str | None) -> str | None:
        return None if caller is None else supervisor.client_tls(self._env, caller).service_token

    def channel(self, caller: str | None, address: str) -> grpc.aio.Channel:
        key = (caller, address)
        if key not in self._open:
            if caller is None:
                self._open[key] = grpc.aio.insecure_channel(address)
            else:
                self._open[key] = rpc.connect(address, supervisor.client_tls(self._env, caller))
        return self._open[key]

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()


async def _run_matrix(mesh: Mesh, served: list[Served], callers: Iterable[str | None]) -> Matrix:
    matrix = Matrix()
    clients = Clients(mesh.env)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(row: Served, caller: str | None) -> None:
        request = GetMessageClass(row.method.input_type)()
        want, account = _expected(caller, access.RULES.get(row.path), request)
        async with limit:
            if row.method.client_streaming:
                token = clients.token(caller)
                code, details = await asyncio.to_thread(_answer_streamed, row.address, row, request, token)
            else:
                code, details = await _answer(clients.channel(caller, row.address), row, request)
        matrix.rows += 1
        matrix.wanted[want] = matrix.wanted.get(want, 0) + 1
        if want is Want.ADMITTED and caller is not None:
            matrix.admitted_callers.add(caller)
        if _mismatch(want, account, caller, row.path, code, details):
            who = caller if caller is not None else "(no identity)"
            matrix.mismatches.append(
                f"{row.path} on {row.server} as {who}: wanted {want.value}, got {code.name} {details!r}"
            )

    try:
        await asyncio.gather(*(one(row, caller) for row in served for caller in callers))
    finally:
        await clients.close()
    matrix.mismatches.sort()
    return matrix


# --- The directory, before and after -------------------------------------------------------------


async def _directory(pool: asyncpg.Pool) -> dict[str, set[str]]:
    """Every row of every table of the preferences schema (the directory and the preferences it owns)."""
    tables = await pool.fetch(
        """select table_name from information_schema.tables
           where table_schema = 'preferences' and table_type = 'BASE TABLE' order by 1"""
    )
    snapshot: dict[str, set[str]] = {}
    for table in tables:
        rows = await pool.fetch(f'select * from preferences."{table["table_name"]}"')
        snapshot[table["table_name"]] = {repr(tuple(row.values())) for row in rows}
    return snapshot


async def _seed(mesh: Mesh) -> None:
    """The bound producer's account and one user, written by the provisioning identity (an allowed caller)."""
    async with rpc.connect(mesh.addresses["preferences"], supervisor.client_tls(mesh.env, "sync")) as channel:
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


async def test_every_caller_against_every_method_of_the_running_mesh(mesh: Mesh, pool: asyncpg.Pool) -> None:
    declared = [d.name for d in service.declared()]
    assert {c.name for c in mesh.children} == set(declared)
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"

    served = await _served(mesh)
    servers_of: dict[str, set[str]] = {}
    for row in served:
        servers_of.setdefault(row.path, set()).add(row.server)
    # Every rule's method is answered by some running service (else the rule guards nothing, or it is misspelt).
    assert sorted(set(access.RULES) - set(servers_of)) == [], "rules for methods no running service serves"

    await _seed(mesh)
    before = await _directory(pool)
    assert {"accounts", "users"} <= set(before), "the directory tables were not found"
    assert any(BOUND_ACCOUNT in row for row in before["accounts"]), "the seeded account is not in the snapshot"
    assert any("'ada'" in row for row in before["users"]), "the seeded user is not in the snapshot"

    callers: list[str | None] = [*declared, *ROLES, STRANGER, None]
    assert len(set(callers)) == len(callers), "a configured identity shares a service's name"
    matrix = await _run_matrix(mesh, served, callers)

    after = await _directory(pool)

    assert matrix.rows == len(served) * len(callers)
    # The table exercised every kind of answer and every configured identity got in somewhere.
    assert set(matrix.wanted) == set(Want), matrix.wanted
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
