"""One exception root for the whole platform.

Domain code raises these; ``belfry.rpc`` maps them to gRPC status codes in
one place, so no servicer ever picks a status code by hand.
"""

from __future__ import annotations


class BelfryError(Exception):
    """Root of every error Belfry raises on purpose.

    ``field`` names the offending request field (sent as a BadRequest
    detail); ``retry_after`` is seconds the caller should wait (sent as a
    RetryInfo detail).
    """

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after


class InvalidArgument(BelfryError):
    """The request itself is wrong; retrying it unchanged never helps."""


class NotFound(BelfryError):
    """A named thing does not exist (in the caller's account)."""


class AlreadyExists(BelfryError):
    """A unique key is taken, e.g. an idempotency key reused with another body."""


class PermissionDenied(BelfryError):
    """The caller is known but may not do this."""


class Unauthenticated(BelfryError):
    """No valid token: missing, forged, expired or for an unknown key."""


class FailedPrecondition(BelfryError):
    """The system is not in a state that allows this (e.g. not an enterprise account)."""


class Aborted(BelfryError):
    """A concurrency conflict (stale version); re-read and retry."""


class ResourceExhausted(BelfryError):
    """Backpressure or a rate limit; ``retry_after`` says when to come back."""


class Unavailable(BelfryError):
    """A dependency is down; the call may be retried as is."""


class ConfigError(BelfryError):
    """The environment does not describe a runnable service."""
