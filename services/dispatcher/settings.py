"""The dispatcher's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from belfry.config import CommonSettings, Env, load_common

from services.dispatcher import backpressure, fanout, follows, validate, watch


@dataclass(frozen=True)
class Settings:
    """Common settings plus the dispatcher's own."""

    common: CommonSettings
    preferences_address: str
    preferences_deadline: float
    limits: validate.Limits
    backpressure: backpressure.Limits
    max_batch: int
    key_hours: float
    retention_days: float
    purge_seconds: float
    fanout_workers: int
    publish_writers: int
    auto_follow: follows.AutoFollow
    fanout: fanout.Tuning
    watch: watch.Tuning


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Read and check every setting; raise one ConfigError naming all problems."""
    env = Env(environ)
    common = load_common("dispatcher", env)
    settings = Settings(
        common=common,
        preferences_address=env.address("BELFRY_PREFERENCES_ADDRESS", "127.0.0.1:50051"),
        preferences_deadline=env.float("BELFRY_DISPATCHER_PREFERENCES_DEADLINE", 5.0, minimum=0.1),
        limits=validate.Limits(
            max_event_bytes=env.int("BELFRY_DISPATCHER_MAX_EVENT_BYTES", 64 * 1024, minimum=1024),
            max_future=timedelta(seconds=env.float("BELFRY_DISPATCHER_MAX_FUTURE_SECONDS", 300.0)),
        ),
        backpressure=backpressure.Limits(
            max_depth=env.int("BELFRY_DISPATCHER_MAX_QUEUE_DEPTH", 200_000),
            max_lag_seconds=env.float("BELFRY_DISPATCHER_MAX_QUEUE_LAG_SECONDS", 300.0),
            max_fanout_lag_seconds=env.float("BELFRY_DISPATCHER_MAX_FANOUT_LAG_SECONDS", 30.0),
            account_rate=env.float("BELFRY_DISPATCHER_ACCOUNT_RATE", 0.0),
            account_burst=env.float("BELFRY_DISPATCHER_ACCOUNT_BURST", 0.0),
            refresh_seconds=env.float("BELFRY_DISPATCHER_BACKLOG_REFRESH_SECONDS", 1.0, minimum=0.01),
        ),
        max_batch=env.int("BELFRY_DISPATCHER_MAX_BATCH", 1000, minimum=1),
        key_hours=env.float("BELFRY_DISPATCHER_IDEMPOTENCY_HOURS", 24.0, minimum=0.001),
        retention_days=env.float("BELFRY_DISPATCHER_RETENTION_DAYS", 30.0, minimum=0.001),
        purge_seconds=env.float("BELFRY_DISPATCHER_PURGE_SECONDS", 60.0, minimum=0.01),
        fanout_workers=env.int("BELFRY_DISPATCHER_FANOUT_WORKERS", 2, minimum=0),
        publish_writers=env.int("BELFRY_DISPATCHER_PUBLISH_WRITERS", 1, minimum=1),
        auto_follow=_auto_follow(env),
        fanout=fanout.Tuning(
            batch=env.int("BELFRY_DISPATCHER_FANOUT_BATCH", 200, minimum=1),
            chunk=env.int("BELFRY_DISPATCHER_FANOUT_CHUNK", 1000, minimum=1),
            assist_lag_seconds=env.float("BELFRY_DISPATCHER_FANOUT_ASSIST_LAG_SECONDS", 1.0),
        ),
        watch=watch.Tuning(
            poll_seconds=env.float("BELFRY_DISPATCHER_WATCH_POLL_SECONDS", 1.0, minimum=0.01),
            margin_seconds=env.float("BELFRY_DISPATCHER_WATCH_MARGIN_SECONDS", 10.0),
        ),
    )
    if common.db_pool_max < settings.fanout_workers + 2:
        env.problem(
            f"BELFRY_DB_POOL_MAX={common.db_pool_max} is too small for BELFRY_DISPATCHER_FANOUT_WORKERS="
            f"{settings.fanout_workers}: each fan-out worker holds a connection, their listener one more, "
            f"and publishing needs one; use at least {settings.fanout_workers + 2}"
        )
    env.check()
    return settings


def _auto_follow(env: Env) -> follows.AutoFollow:
    try:
        return follows.parse(env.str("BELFRY_DISPATCHER_AUTO_FOLLOW", follows.DEFAULT))
    except ValueError as exc:
        env.problem(f"BELFRY_DISPATCHER_AUTO_FOLLOW: {exc}")
        return follows.parse(follows.DEFAULT)
