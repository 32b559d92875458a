"""Settings of the preferences service, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings


@dataclass(frozen=True)
class Settings:
    """Common settings plus the service's own."""

    common: CommonSettings
    # Largest EffectiveBatch / GetUsers request: bounds one call's memory and time.
    max_batch: int
    # Web app address used in the "your defaults changed" email.
    app_url: str
    # Where those notices are published, and the sender that publishes them (queue channel "dispatcher").
    dispatcher_address: str
    notices: SenderSettings


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("preferences", env)
    max_batch = env.int("BELFRY_PREFERENCES_MAX_BATCH", 1000, minimum=1)
    app_url = env.str("BELFRY_APP_URL", "http://127.0.0.1:8080")
    dispatcher_address = env.address("BELFRY_DISPATCHER_ADDRESS", "127.0.0.1:50052")
    notices = load_sender_settings(env, common, "notices", batch=50, concurrency=4, lease_seconds=30.0)
    env.check()
    return Settings(
        common=common, max_batch=max_batch, app_url=app_url, dispatcher_address=dispatcher_address, notices=notices
    )
