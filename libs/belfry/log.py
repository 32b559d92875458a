"""structlog set-up: JSON lines to stdout, context bound per request."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, service: str, level: str = "info", json: bool = True) -> None:
    """Configure structlog once per process; every line carries the service name."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # One write per line (PrintLogger writes the line and its newline apart): the worker
        # processes of a pod share one stdout, and whole lines of up to PIPE_BUF never interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger named after its module."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
