"""The allow-list matrix both end-to-end allow-list tests hold the running mesh to.

Which service serves which method is read from the running servers themselves
(reflection lists their services and hands over the descriptors the empty
requests are built from), so nothing here is a list that could go stale. Each
caller calls each method once with an empty request, and the answer is held to
``belfry.access.RULES``: refused callers get the gate's PERMISSION_DENIED, a
producer bound to other accounts gets the account refusal, allowed callers get
past the gate. The directory must hold afterwards exactly what it held before.
How a caller reaches a server (plaintext with a service token, or mutual TLS)
is the test's: a ``Dial`` per caller.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
from belfry import access
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.local import supervisor
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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
HANDSHAKE_REFUSED = "UNAVAILABLE (TLS handshake refused)"


@dataclass
class Mesh:
    env: dict[str, str]
    children: list[supervisor.Child]
    addresses: dict[str, str]  # service name -> its gRPC address


@dataclass(frozen=True)
class Dial:
    """How one caller reaches a server: a grpc.aio channel, a blocking one, and the metadata blocking calls carry."""

    aio: Callable[[str], grpc.aio.Channel]
    sync: Callable[[str], grpc.Channel]
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Caller:
    """Who calls: a label for the report, the identity the gate must read (None: none), how it reaches a server."""

    label: str
    name: str | None
    dial: Dial
    handshake: bool = True  # False: the server must refuse the certificate during the TLS handshake


# --- What the running servers serve --------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One method as one running service serves it."""

    path: str  # /package.Service/Method
    server: str  # the declared service whose process answers it
    address: str
    method: MethodDescriptor


async def _reflect(address: str, dial: Dial) -> tuple[list[str], dict[str, descriptor_pb2.FileDescriptorProto]]:
    """The services a server lists through reflection, and the files (with dependencies) that declare them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    async with dial.aio(address) as channel:
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


async def _served(addresses: dict[str, str], dial: Dial) -> list[Served]:
    """Every method each running service answers (health and reflection are the kit's, open to all)."""
    found: list[Served] = []
    for server, address in addresses.items():
        names, files = await _reflect(address, dial)
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


def _answer_streamed(dial: Dial, served: Served, request: Message) -> tuple[grpc.StatusCode, str]:
    """Call ``served`` (a request stream) with one message, then close: the status, or OK once a first answer arrived.

    Blocking, through the sync client: when a server ends a call before reading (the gate's refusal), a
    grpc.aio client whose request write loses that race reports INTERNAL "Internal error from Core" instead of
    the server's status (grpc/grpc#36066, still so in grpcio 1.85); the sync client reports the server's status.
    """
    with dial.sync(served.address) as channel:
        kind = channel.stream_stream if served.method.server_streaming else channel.stream_unary
        multicallable = kind(served.path, request_serializer=_serialize, response_deserializer=_raw)
        call = None
        try:
            if not served.method.server_streaming:
                multicallable(iter([request]), timeout=CALL_TIMEOUT, metadata=dial.metadata)
                return grpc.StatusCode.OK, ""
            call = multicallable(iter([request]), timeout=CALL_TIMEOUT, metadata=dial.metadata)
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


async def _run_matrix(served: list[Served], callers: Sequence[Caller], no_identity: str | None) -> Matrix:
    """Every caller against every method; ``no_identity``: the exact details UNAUTHENTICATED must carry (None: any)."""
    matrix = Matrix()
    channels: dict[tuple[str, str], grpc.aio.Channel] = {}
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(row: Served, caller: Caller) -> None:
        request = GetMessageClass(row.method.input_type)()
        want, account = _expected(caller.name, access.RULES.get(row.path), request)
        wanted = want.value if caller.handshake else HANDSHAKE_REFUSED
        async with limit:
            if row.method.client_streaming:
                code, details = await asyncio.to_thread(_answer_streamed, caller.dial, row, request)
            else:
                key = (caller.label, row.address)
                if key not in channels:
                    channels[key] = caller.dial.aio(row.address)
                code, details = await _answer(channels[key], row, request)
        matrix.rows += 1
        matrix.wanted[wanted] = matrix.wanted.get(wanted, 0) + 1
        if not caller.handshake:
            wrong = code != grpc.StatusCode.UNAVAILABLE
        elif want is Want.UNAUTHENTICATED and no_identity is not None:
            wrong = not (code == grpc.StatusCode.UNAUTHENTICATED and details == no_identity)
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


async def _seed(address: str, dial: Dial) -> None:
    """The bound producer's account and one user, written by the provisioning identity (an allowed caller)."""
    async with dial.aio(address) as channel:
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


# --- The check -------------------------------------------------------------------------------------


async def check_every_caller(
    mesh: Mesh,
    pool: asyncpg.Pool,
    callers: Sequence[Caller],
    *,
    reflecting: Dial,
    provisioning: Dial,
    no_identity: str | None = None,
) -> None:
    """Every caller against every method the mesh serves (listed through ``reflecting``), on a directory seeded
    through ``provisioning``: each answer as the rules say, every kind of answer seen, nothing written."""
    served = await _served(mesh.addresses, reflecting)
    servers_of: dict[str, set[str]] = {}
    for row in served:
        servers_of.setdefault(row.path, set()).add(row.server)
    # Every rule's method is answered by some running service (else the rule guards nothing, or it is misspelt).
    assert sorted(set(access.RULES) - set(servers_of)) == [], "rules for methods no running service serves"

    await _seed(mesh.addresses["preferences"], provisioning)
    before = await _directory(pool)
    assert {"accounts", "users"} <= set(before), "the directory tables were not found"
    assert any(BOUND_ACCOUNT in row for row in before["accounts"]), "the seeded account is not in the snapshot"
    assert any("'ada'" in row for row in before["users"]), "the seeded user is not in the snapshot"

    assert len({c.label for c in callers}) == len(callers), "a configured identity shares a service's name"
    matrix = await _run_matrix(served, callers, no_identity)

    after = await _directory(pool)

    assert matrix.rows == len(served) * len(callers)
    # The table exercised every kind of answer and every configured identity got in somewhere.
    refusals = {HANDSHAKE_REFUSED} if not all(c.handshake for c in callers) else set()
    assert set(matrix.wanted) == {w.value for w in Want} | refusals, matrix.wanted
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
