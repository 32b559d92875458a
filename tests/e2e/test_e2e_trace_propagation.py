"""One trace from a browser's HTTP call, through the gateway proxy, to the preferences service.

The real gateway and the real preferences service run in-process (port 0,
as in ``tests/gateway/test_gateway_proxy.py``), on this module's database.
The gateway binds the request's trace (its ``traceparent`` header when
valid, else a new one), names it in the ``traceresponse`` header, and its
gRPC call carries it on: preferences' log lines for the call must have the
same ``trace_id``.

Preferences' lines are read from its canonical ``rpc`` line (``belfry.rpc``;
``debug`` for a call that succeeds). The project's loggers are cached on
first use (``belfry.log``), so a logger first used before the test, under
an earlier configuration, would not reach ``structlog.testing.capture_logs``:
the test gives ``belfry.rpc`` a fresh capturing logger instead, with the same
context (``merge_contextvars``) and every level.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from belfry import rpc, service, trace
from belfry.auth import TokenIssuer
from structlog.typing import EventDict

from services.gateway import server as gateway_server
from services.gateway import settings as gateway_settings
from services.gateway.api import TRACE_RESPONSE_HEADER
from tests.conftest import common_env
from tests.gateway import browser as b

SET_MUTED = "/belfry.api.preferences.v1.PreferencesService/SetMuted"
GET_PREFERENCES = "/belfry.api.preferences.v1.PreferencesService/GetPreferences"


@pytest.fixture(scope="module")
async def preferences(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[service.Running]:
    """The real preferences service."""
    running = await b.start_preferences(database_url, token_keys)
    yield running
    await running.stop(0.2)


@pytest.fixture(scope="module")
async def gateway(
    database_url: str, token_keys: dict[str, bytes], preferences: service.Running
) -> AsyncIterator[gateway_server.GatewayBuild]:
    """The real gateway, proxying to ``preferences`` (webpush is not reached by these tests)."""
    env = common_env(
        database_url,
        token_keys,
        identity="gateway",
        BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
        BELFRY_GATEWAY_HTTP_PORT="0",
        BELFRY_WORKER_ID=f"gw-{uuid.uuid4().hex[:6]}",
        BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}",
    )
    s = gateway_settings.load_settings(env)
    build = gateway_server.GatewayBuild(s)
    running = await service.start("gateway", s.common, build)
    yield build
    await running.stop(0.2)


@pytest.fixture
async def http(
    gateway: gateway_server.GatewayBuild, preferences: service.Running, token_keys: dict[str, bytes], account_id: str
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway, signed in as a user preferences knows."""
    await b.seed_user(preferences.port, account_id, "u1")
    token = TokenIssuer(token_keys, "k1").issue(account_id, "u1")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}", headers={"authorization": f"Bearer {token}"}
    ) as client:
        yield client


@pytest.fixture
def rpc_lines(monkeypatch: pytest.MonkeyPatch) -> list[EventDict]:
    """Every line ``belfry.rpc`` logs during the test (all levels), with its bound context."""
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(
        structlog.testing.CapturingLogger(),
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    monkeypatch.setattr(rpc, "_LOG", logger)
    return capture.entries


def _traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def _named(response: httpx.Response) -> str:
    """The trace id the gateway's ``traceresponse`` header names (it parses like a traceparent)."""
    found = trace.parse_traceparent(response.headers[TRACE_RESPONSE_HEADER])
    assert found is not None, response.headers[TRACE_RESPONSE_HEADER]
    return found


def _traces_of(lines: list[EventDict], method: str) -> list[str]:
    return [line["trace_id"] for line in lines if line.get("event") == "rpc" and line.get("method") == method]


async def test_the_callers_traceparent_reaches_preferences_through_the_gateway(
    http: httpx.AsyncClient, rpc_lines: list[EventDict]
) -> None:
    trace_id, traceparent = _traceparent()
    reply = await http.post("/api/preferences/SetMuted", json={"muted": True}, headers={"traceparent": traceparent})
    assert reply.status_code == 200, reply.text
    assert _named(reply) == trace_id
    # The gateway's own span id is named, not the caller's.
    assert reply.headers[TRACE_RESPONSE_HEADER] != traceparent
    assert _traces_of(rpc_lines, SET_MUTED) == [trace_id]
    assert next(line for line in rpc_lines if line.get("method") == SET_MUTED)["code"] == "OK"


async def test_a_call_without_a_traceparent_gets_a_fresh_trace_the_response_names(
    http: httpx.AsyncClient, rpc_lines: list[EventDict]
) -> None:
    first = await http.post("/api/preferences/GetPreferences", json={})
    second = await http.post("/api/preferences/GetPreferences", json={})
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    named = [_named(first), _named(second)]
    assert named[0] != named[1]
    assert _traces_of(rpc_lines, GET_PREFERENCES) == named


@pytest.mark.parametrize(
    "broken",
    [
        "garbage",
        "00-{trace}-{span}-01".format(trace="A" * 32, span="b" * 16),  # upper-case hex
        "00-{trace}-{span}-01".format(trace="0" * 32, span="b" * 16),  # all-zero trace id
        "ff-{trace}-{span}-01".format(trace="a" * 32, span="b" * 16),  # version ff
    ],
)
async def test_an_invalid_traceparent_header_is_ignored_and_the_request_gets_a_fresh_trace(
    http: httpx.AsyncClient, rpc_lines: list[EventDict], broken: str
) -> None:
    reply = await http.post("/api/preferences/GetPreferences", json={}, headers={"traceparent": broken})
    assert reply.status_code == 200, reply.text
    named = _named(reply)
    assert named not in broken.lower()
    assert _traces_of(rpc_lines, GET_PREFERENCES) == [named]


async def test_an_error_from_preferences_keeps_the_trace(http: httpx.AsyncClient, rpc_lines: list[EventDict]) -> None:
    trace_id, traceparent = _traceparent()
    reply = await http.post(
        "/api/preferences/SetTopicSound",
        json={"topic": "academy.reward_updated", "sound": "kazoo"},
        headers={"traceparent": traceparent},
    )
    assert reply.status_code == 400 and _named(reply) == trace_id
    line = next(line for line in rpc_lines if line.get("event") == "rpc")
    assert (line["code"], line["trace_id"], line["log_level"]) == ("INVALID_ARGUMENT", trace_id, "info")


async def test_the_feed_api_and_the_gateways_own_refusals_name_the_trace_too(http: httpx.AsyncClient) -> None:
    trace_id, traceparent = _traceparent()
    unread = await http.get("/api/unread", headers={"traceparent": traceparent})
    assert unread.status_code == 200 and _named(unread) == trace_id
    refused = await http.post("/api/preferences/GetPreferences", json={}, headers={"authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert re.fullmatch(r"[0-9a-f]{32}", _named(refused))
