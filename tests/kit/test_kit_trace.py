"""The trace id of a call (``belfry.trace``) and the log format choice (``belfry.log``)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid

import pytest
from belfry import log, trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        f"00-{TRACE}-00f067aa0ba902b7-00",  # not sampled: still a trace
        f"  {VALID} ",  # surrounding white space is tolerated
        f"cc-{TRACE}-00f067aa0ba902b7-01-what-a-later-version-adds",  # a later version's extra fields are ignored
    ],
)
def test_a_valid_traceparent_gives_its_trace_id(value: str) -> None:
    assert trace.parse_traceparent(value) == TRACE
    assert trace.from_metadata([("authorization", "Bearer x"), ("traceparent", value)]) == TRACE


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID.upper(),  # hex must be lower case
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is forbidden
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",  # a digit short
        f"00_{TRACE}_00f067aa0ba902b7_01",
    ],
)
def test_an_invalid_traceparent_is_ignored_and_the_call_gets_a_new_trace_id(value: str) -> None:
    assert trace.parse_traceparent(value) is None
    made = trace.from_metadata([("traceparent", value)])
    assert trace.is_trace_id(made) and made != TRACE


def test_without_a_traceparent_each_call_gets_its_own_trace_id() -> None:
    first, second = trace.from_metadata(None), trace.from_metadata([("x-other", "1")])
    assert trace.is_trace_id(first) and trace.is_trace_id(second) and first != second


def test_the_trace_id_is_current_while_bound_and_round_trips_through_its_stored_form() -> None:
    assert trace.current() is None
    token = trace.bind(TRACE)
    try:
        assert trace.current() == TRACE
    finally:
        trace.reset(token)
    assert trace.current() is None
    stored = trace.as_uuid(TRACE)
    assert stored == uuid.UUID(TRACE) and trace.as_hex(stored) == TRACE
    assert trace.as_uuid(None) is None and trace.as_hex(None) is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_log_lines_are_json_unless_stdout_is_a_terminal_and_belfry_log_json_decides_when_set(
    tty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdout", _Terminal() if tty else io.StringIO())
    # Unset: the settings' default (true) cannot say it was chosen, so the terminal decides.
    assert log.wants_json(True, {}) is (not tty)
    assert log.wants_json(None, {}) is (not tty)
    # Set: it decides, terminal or not.
    assert log.wants_json(True, {"BELFRY_LOG_JSON": "true"}) is True
    assert log.wants_json(False, {"BELFRY_LOG_JSON": "false"}) is False


def test_a_line_names_what_its_task_is_working_on_and_only_that_task() -> None:
    # In a process of its own: log.configure sets structlog up for the whole process.
    script = """
import asyncio, json, sys
from belfry import log

class Lease:
    def log_fields(self):
        return {"delivery_id": 7, "channel": "email"}

async def handler(subject):
    log.working_on(subject)
    log.get("t").warning("in the handler", channel="given")

async def main():
    log.configure(service="probe", json=True)
    await asyncio.gather(asyncio.create_task(handler(Lease())), asyncio.create_task(handler(None)))
    log.get("t").warning("outside")

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout  # noqa: S603
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["event"], x.get("delivery_id"), x.get("channel")) for x in lines] == [
        ("in the handler", 7, "given"),  # the subject's fields; a field the line gives itself wins
        ("in the handler", None, "given"),
        ("outside", None, None),  # set inside a task: the task's context only
    ]
    assert all(x["service"] == "probe" for x in lines)
