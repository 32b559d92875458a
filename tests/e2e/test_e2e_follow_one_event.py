"""An operator follows one notification through the mesh by its logs and metrics (docs/observability.md).

Every service runs as its own process under the supervisor of ``belfry up``
(ports and metrics ports bound to 0), on this module's database, mailing a
real SMTP server (the mail catcher). One event is published with a W3C
``traceparent``; once its email and bell deliveries are sent, the services'
JSON log lines must name the notification and the trace, and their /metrics
must show the documented series for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from belfry import rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.local import demo, mailcatcher, supervisor
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import client_tls, common_env

TOPIC = "comments.mentioned"  # email and bell on by default
PUBLISH = f"/{dispatcher_pb2.DESCRIPTOR.services_by_name['DispatcherService'].full_name}/Publish"
# Give up (and fail) if the mesh has not done its part by then; nothing is asserted about speed.
PATIENCE = 60.0

LogLine = dict[str, Any]


@dataclass
class Mesh:
    env: dict[str, str]
    children: list[supervisor.Child]
    mail: Path
    logs: Path

    def channel(self, name: str) -> grpc.aio.Channel:
        return rpc.connect(self.env[f"BELFRY_{name.upper()}_ADDRESS"], client_tls())

    def lines(self) -> list[LogLine]:
        """Every line the services have written to stdout so far, each parsed as JSON (a line that is not fails)."""
        text = self.logs.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
        return [json.loads(line) for line in complete.splitlines() if line]

    def metrics_port(self, name: str) -> int:
        """Where ``name`` serves /metrics: its "serving" line reports the port it bound (the address says 0)."""
        ports = [
            int(line["metrics_port"])
            for line in self.lines()
            if line.get("service") == name and line.get("event") == "serving"
        ]
        assert len(ports) == 1, f"{name} logged {len(ports)} serving lines"
        return ports[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _stdout_to(path: Path) -> Iterator[None]:
    """Point this process's stdout at ``path`` while children are spawned, then back.

    The supervisor lets each child inherit stdout (where ``belfry up`` shows
    their log lines in the terminal); a child spawned meanwhile keeps writing
    to the file. O_APPEND: each child's line goes in whole, at the end.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(target, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    home = tmp_path_factory.mktemp("follow")
    catcher, smtp_port = mailcatcher.start(home / "mail")
    http_port = _free_port()
    env = dict(os.environ)
    env.update(common_env(database_url, token_keys))
    env.update(
        BELFRY_SMTP_HOST="127.0.0.1",
        BELFRY_SMTP_PORT=str(smtp_port),
        BELFRY_SMTP_STARTTLS="false",
        BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
        BELFRY_GATEWAY_HTTP_PORT=str(http_port),
        BELFRY_PUBLIC_URL=f"http://127.0.0.1:{http_port}",
        BELFRY_VAPID_PRIVATE_KEY_FILE=str(home / "vapid.pem"),
        BELFRY_LOG_LEVEL="info",  # the lines an operator follows are info lines
        BELFRY_METRICS_ADDRESS="127.0.0.1:0",
        BELFRY_UNSUBSCRIBE_KEY="u" * 48,
        BELFRY_WEBHOOK_SECRET_KEY_FILE=str(home / "webhook_secret.key"),
    )
    # Unset: stdout is a file here, not a terminal, so the services must choose JSON on their own.
    env.pop("BELFRY_LOG_JSON", None)
    for declared in service.declared():
        env[f"BELFRY_{declared.name.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    logs = home / "stdout.jsonl"
    with _stdout_to(logs):
        children = await supervisor.start_mesh(env)
    try:
        yield Mesh(env, children, home / "mail", logs)
    finally:
        await supervisor.stop_all(children, 15)
        catcher.stop()


async def _seed(mesh: Mesh, account_id: str, users: list[str]) -> None:
    async with mesh.channel("preferences") as chan:
        directory = directory_pb2_grpc.DirectoryServiceStub(chan)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="E2E", tier=directory_pb2.TIER_PROFESSIONAL)
            )
        )
        for user in users:
            await directory.UpsertUser(
                directory_pb2.UpsertUserRequest(
                    user=directory_pb2.User(
                        account_id=account_id,
                        user_id=user,
                        email=f"{user}.{account_id}@example.test",
                        display_name=user.title(),
                        locale="en",
                        time_zone="UTC",
                        permission_set="sales",
                        active=True,
                    )
                )
            )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(port: int) -> Samples:
    """Every sample a service's /metrics serves, by name and labels."""
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    answer.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for ``check``; fail if it never holds (a give-up bound, not a speed requirement)."""
    try:
        async with asyncio.timeout(PATIENCE):
            # Other processes and the database change what is checked: there is nothing to await but time.
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}") from None


async def _until_logged(mesh: Mesh, what: str, match: Callable[[LogLine], bool], count: int = 1) -> list[LogLine]:
    """The lines ``match`` accepts, once there are ``count`` (the services write them just after they commit)."""
    found: list[LogLine] = []

    async def logged() -> bool:
        found[:] = [line for line in mesh.lines() if match(line)]
        return len(found) >= count

    await _until(what, logged)
    return found


def _traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


async def test_one_notification_is_followed_by_its_trace_through_logs_and_metrics(
    mesh: Mesh, account_id: str, pool: asyncpg.Pool
) -> None:
    await _seed(mesh, account_id, ["alice", "carol"])
    ports = {name: mesh.metrics_port(name) for name in ("dispatcher", "email", "gateway")}
    before = {name: await _scrape(port) for name, port in ports.items()}
    trace_id, traceparent = _traceparent()

    async with mesh.channel("dispatcher") as chan:
        event = demo.event(account_id=account_id, topic=TOPIC, recipients=["alice"], actor="carol", object_name="Q-1")
        published = await dispatcher_pb2_grpc.DispatcherServiceStub(chan).Publish(
            dispatcher_pb2.PublishRequest(event=event), metadata=[("traceparent", traceparent)]
        )
    notification_id = published.notification_id

    async def delivered() -> bool:  # both rows sent, the mail caught
        states = await pool.fetch(
            "select channel, state from queue.deliveries where account_id = $1 and notification_id = $2",
            account_id,
            uuid.UUID(notification_id),
        )
        # The topic reaches the browser and mobile channels too; alice has neither, so those are dropped.
        sent = {("email", "sent"), ("bell", "sent")} <= {(r["channel"], r["state"]) for r in states}
        return sent and any(f"alice.{account_id}" in m.to for m in mailcatcher.caught(mesh.mail))

    await _until("the email and the bell item to be sent", delivered)
    # Stored once per delivery, as the 16 bytes of the caller's trace id.
    stored = await pool.fetch(
        "select trace_id from queue.deliveries where account_id = $1 and notification_id = $2",
        account_id,
        uuid.UUID(notification_id),
    )
    assert len(stored) >= 2 and [r["trace_id"] for r in stored] == [uuid.UUID(hex=trace_id)] * len(stored)

    # Logs: the dispatcher ties the notification to the trace; each sender logs its outcome with both.
    fanned = await _until_logged(
        mesh,
        "the dispatcher's fan-out of the notification",
        lambda line: line.get("service") == "dispatcher" and line.get("notification_id") == notification_id,
    )
    assert [(line["event"], line["trace_id"], line["account_id"], line["deliveries"]) for line in fanned] == [
        ("fanned out", trace_id, account_id, len(stored))
    ]
    assert fanned[0]["logger"] == "services.dispatcher.fanout" and fanned[0]["level"] == "info"
    for name, channel in (("email", "email"), ("gateway", "bell")):

        def outcome(line: LogLine, name: str = name) -> bool:
            return (
                line.get("service") == name
                and line.get("event") == "delivery settled"
                and line.get("notification_id") == notification_id
            )

        settled = await _until_logged(mesh, f"{name}'s outcome of the {channel} delivery", outcome)
        assert len(settled) == 1, settled
        line = settled[0]
        assert {key: line[key] for key in ("notification_id", "trace_id", "account_id", "channel", "outcome")} == {
            "notification_id": notification_id,
            "trace_id": trace_id,
            "account_id": account_id,
            "channel": channel,
            "outcome": "sent",
        }
        assert isinstance(line["delivery_id"], int) and line["level"] == "info"
        assert line["logger"] == "belfry.queue.worker" and line["age_seconds"] >= 0

    # Metrics: the documented names and labels, this one delivery counted on each channel.
    after = {name: await _scrape(port) for name, port in ports.items()}
    for name, channel in (("email", "email"), ("gateway", "bell")):
        labels = {"channel": channel, "outcome": "sent"}
        for metric in ("belfry_deliveries_total", "belfry_end_to_end_seconds_count"):
            assert _value(after[name], metric, **labels) - _value(before[name], metric, **labels) == 1, (name, metric)
        assert _value(after[name], "belfry_end_to_end_seconds_bucket", **labels, le="+Inf") >= 1
        assert _value(after[name], "belfry_end_to_end_seconds_sum", **labels) > 0
    published_ok = {"service": "dispatcher", "method": PUBLISH, "code": "OK"}
    assert (
        _value(after["dispatcher"], "belfry_rpc_requests_total", **published_ok)
        - _value(before["dispatcher"], "belfry_rpc_requests_total", **published_ok)
        == 1
    )
    assert (
        _value(after["dispatcher"], "belfry_events_published_total", outcome="accepted")
        - _value(before["dispatcher"], "belfry_events_published_total", outcome="accepted")
        == 1
    )


async def test_the_canonical_rpc_line_carries_the_callers_trace_and_makes_one_for_an_invalid_traceparent(
    mesh: Mesh, account_id: str
) -> None:
    trace_id, traceparent = _traceparent()
    broken = f"00-{trace_id.upper()}-{secrets.token_hex(8)}-01"  # upper-case hex: not a valid traceparent
    codes: list[str] = []
    async with mesh.channel("dispatcher") as chan:
        dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(chan)
        for metadata in ([("traceparent", traceparent)], [("traceparent", broken)]):
            # Refused (an account nobody created): a failed call's canonical line is logged at info.
            event = demo.event(account_id=account_id, topic=TOPIC, recipients=["alice"])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await dispatcher.Publish(dispatcher_pb2.PublishRequest(event=event), metadata=metadata)
            codes.append(caught.value.code().name)
    assert codes == ["NOT_FOUND", "NOT_FOUND"]

    def canonical(line: LogLine) -> bool:
        # The dispatcher's own lines: the preferences service logs the call the dispatcher made to it too.
        return line.get("event") == "rpc" and line.get("account_id") == account_id and line["service"] == "dispatcher"

    lines = await _until_logged(mesh, "the two calls' canonical lines", canonical, count=2)
    assert len(lines) == 2, lines
    for line in lines:
        assert (line["service"], line["method"], line["code"], line["level"], line["logger"]) == (
            "dispatcher",
            PUBLISH,
            "NOT_FOUND",
            "info",
            "belfry.rpc",
        )
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    first, second = lines
    assert first["trace_id"] == trace_id
    # The invalid traceparent was ignored, not refused nor half-read: the call got a trace id of its own.
    assert second["trace_id"] not in {trace_id, trace_id.upper()}
