"""Settings of the batching service, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings

from services.batching.schedule import Weekly


@dataclass(frozen=True)
class Settings:
    """Common settings plus the service's own."""

    common: CommonSettings
    preferences_address: str
    window_seconds: float  # how long assignments wait to be merged
    tick_seconds: float  # how often due windows are looked for (the window's precision)
    digest_tick_seconds: float
    task_digest: Weekly  # local day and time of the weekly task digest
    workflow_digest: Weekly  # local day and time of the Friday workflow digest
    task_digest_topic: str
    workflow_digest_topic: str
    digest_ttl_seconds: float  # a digest not delivered by then is expired, not sent late
    retention_seconds: float  # closed windows, applied delivery ids and workflow changes are kept this long
    # The intake's queue settings; its lease is also how long a replica owns a window or digest it is closing,
    # and its worker id names the replica in those leases and records.
    sender: SenderSettings


def _weekly(env: Env, name: str, default: str) -> Weekly:
    raw = env.str(name, default)
    try:
        return Weekly.parse(raw)
    except ValueError as exc:
        env.problem(f"{name}: {exc}")
        return Weekly.parse(default)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("batching", env)
    settings = Settings(
        common=common,
        preferences_address=env.address("BELFRY_PREFERENCES_ADDRESS", "127.0.0.1:50051"),
        window_seconds=env.float("BELFRY_BATCHING_WINDOW_SECONDS", 300.0, minimum=0.0),
        tick_seconds=env.float("BELFRY_BATCHING_TICK_SECONDS", 1.0, minimum=0.01),
        digest_tick_seconds=env.float("BELFRY_BATCHING_DIGEST_TICK_SECONDS", 30.0, minimum=0.01),
        task_digest=_weekly(env, "BELFRY_BATCHING_TASK_DIGEST_AT", "mon 08:00"),
        workflow_digest=_weekly(env, "BELFRY_BATCHING_WORKFLOW_DIGEST_AT", "fri 16:00"),
        task_digest_topic=env.str("BELFRY_BATCHING_TASK_DIGEST_TOPIC", "tasks.weekly_digest"),
        workflow_digest_topic=env.str("BELFRY_BATCHING_WORKFLOW_DIGEST_TOPIC", "workflows.friday_digest"),
        digest_ttl_seconds=env.float("BELFRY_BATCHING_DIGEST_TTL_SECONDS", 86400.0, minimum=60.0),
        retention_seconds=env.float("BELFRY_BATCHING_RETENTION_SECONDS", 14 * 86400.0, minimum=8 * 86400.0),
        sender=load_sender_settings(
            env, common, "batching", batch=100, concurrency=20, lease_seconds=30.0, min_lease_seconds=1.0
        ),
    )
    env.check()
    return settings
