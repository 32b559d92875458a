"""structlog set-up: one line per event, context bound per request.

Every line carries the service (bound at start-up), the logger (the module
that logged) and whatever the current call bound or the current task is
working on (``working_on``, e.g. a sender's delivery)
(``docs/observability.md`` lists the fields). Lines are JSON when stdout is
not a terminal (a pod, a pipe, a file) and human-readable when it is, unless
``BELFRY_LOG_JSON`` says which.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

import structlog

LOG_JSON = "BELFRY_LOG_JSON"


def wants_json(configured: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """JSON or console lines: ``configured`` when ``BELFRY_LOG_JSON`` is set, else JSON unless stdout is a TTY.

    The settings default BELFRY_LOG_JSON to true, so their value alone cannot
    tell a choice from the default: whether the variable is present can.
    """
    env = os.environ if environ is None else environ
    if configured is not None and env.get(LOG_JSON, "").strip():
        return configured
    return not sys.stdout.isatty()


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger with the name it was made for, which ``add_logger_name`` reads."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    """Makes ``_NamedWriteLogger``s on one file; ``structlog.get_logger(name)`` passes the name here."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "")


class Subject(Protocol):
    """What a task is working on, named on every line it logs (e.g. a sender's lease)."""

    def log_fields(self) -> dict[str, object]:
        """The fields to add to each line."""
        ...


# Set per task (asyncio copies the context into each task): one ContextVar.set per unit of work instead of
# a bind_contextvars of several names, and the fields are built only when a line is written.
_SUBJECT: contextvars.ContextVar[Subject | None] = contextvars.ContextVar("belfry_log_subject", default=None)


def working_on(subject: Subject | None) -> None:
    """Name ``subject`` on every line this task logs from now on (None: nothing)."""
    _SUBJECT.set(subject)


def context() -> dict[str, object]:
    """The fields a line logged now, from this task, would carry from its context (bound names, the subject)."""
    return dict(_merge_subject(None, "", structlog.contextvars.get_contextvars()))


def _merge_subject(
    logger: structlog.typing.WrappedLogger, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    subject = _SUBJECT.get()
    if subject is not None:
        for key, value in subject.log_fields().items():
            event.setdefault(key, value)
    return event


def configure(*, service: str, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once per process; every line carries the service name (``json``: see ``wants_json``)."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if wants_json(json)
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _merge_subject,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # One write per line (PrintLogger writes the line and its newline apart): the worker
        # processes of a pod share one stdout, and whole lines of up to PIPE_BUF never interleave.
        logger_factory=_NamedWriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger named after its module; its lines carry the name as ``logger``."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
