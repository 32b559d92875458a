"""Settings of the websocket gateway, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from belfry import unsubscribe
from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings

from services.gateway import limits

# uvicorn's websocket implementations the gateway runs on (its ``ws`` option): wsproto holds an idle tab in
# less memory; websockets-sansio is the one uvicorn picks by default.
WEBSOCKET_IMPLEMENTATIONS = ("wsproto", "websockets-sansio")


@dataclass(frozen=True)
class Settings:
    """Everything ``python -m services.gateway`` needs."""

    common: CommonSettings
    http_host: str
    http_port: int
    allowed_origins: frozenset[str]
    presence_ttl: float
    queue_size: int  # frames buffered per connection before it counts as a slow consumer
    resume_limit: int  # a client further behind than this is told to reload its feed
    auth_timeout: float
    send_timeout: float
    dev_login: bool
    demo_account: str
    demo_user: str
    preferences_target: str
    webpush_target: str
    dispatcher_target: str  # its FollowService: the web app's "Mute this thread" and "Unfollow"
    sender: SenderSettings  # the bell sender; its worker id also names this replica's presence rows
    unsubscribe_key: bytes | None  # verifies the email sender's one-click unsubscribe links
    unsubscribe_other_keys: tuple[bytes, ...]  # also accepted: the next or previous key of a rotation
    bounds: limits.Bounds  # body size, request rates, socket caps
    link_origins: frozenset[str]  # origins a notification click may open besides the app's own
    websocket: str  # uvicorn's websocket implementation (memory per idle tab: docs/benchmarks.md)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and check the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("gateway", env)
    origins = frozenset(
        o.strip().rstrip("/") for o in env.str("BELFRY_GATEWAY_ALLOWED_ORIGINS", "").split(",") if o.strip()
    )
    for origin in origins:
        if not origin.startswith(("https://", "http://")):
            env.problem(
                f"BELFRY_GATEWAY_ALLOWED_ORIGINS entry {origin!r} must be an origin such as https://app.example"
            )
    dev_login = env.bool("BELFRY_GATEWAY_DEV_LOGIN", False)
    if dev_login and not common.token_keys:
        env.problem("BELFRY_GATEWAY_DEV_LOGIN=true needs BELFRY_TOKEN_KEYS to sign the demo user's token")
    if not common.token_keys and common.user_tokens.oidc is None:
        env.problem(
            "the gateway verifies every user's token: set BELFRY_OIDC_ISSUER and BELFRY_OIDC_AUDIENCE "
            "(or BELFRY_TOKEN_KEYS for a local run)"
        )
    unsubscribe_key = env.str("BELFRY_UNSUBSCRIBE_KEY", "")
    if unsubscribe_key and len(unsubscribe_key) < 32:
        env.problem("BELFRY_UNSUBSCRIBE_KEY must be the email sender's key (at least 32 characters)")
    settings = Settings(
        common=common,
        http_host=env.str("BELFRY_GATEWAY_HTTP_HOST", "0.0.0.0"),  # noqa: S104 - a server listens on all interfaces
        http_port=env.int("BELFRY_GATEWAY_HTTP_PORT", 8080),
        allowed_origins=origins,
        presence_ttl=env.float("BELFRY_GATEWAY_PRESENCE_TTL_SECONDS", 30.0, minimum=0.1),
        queue_size=env.int("BELFRY_GATEWAY_QUEUE_SIZE", 64, minimum=1),
        resume_limit=env.int("BELFRY_GATEWAY_RESUME_LIMIT", 200, minimum=1),
        auth_timeout=env.float("BELFRY_GATEWAY_AUTH_TIMEOUT_SECONDS", 2.0, minimum=0.1),
        send_timeout=env.float("BELFRY_GATEWAY_SEND_TIMEOUT_SECONDS", 10.0, minimum=0.1),
        dev_login=dev_login,
        demo_account=env.str("BELFRY_DEMO_ACCOUNT", "demo"),
        demo_user=env.str("BELFRY_DEMO_USER", "alice"),
        preferences_target=env.address("BELFRY_PREFERENCES_ADDRESS", "127.0.0.1:50051"),
        webpush_target=env.address("BELFRY_WEBPUSH_ADDRESS", "127.0.0.1:50055"),
        dispatcher_target=env.address("BELFRY_DISPATCHER_ADDRESS", "127.0.0.1:50052"),
        sender=load_sender_settings(env, common, "gateway", batch=200, concurrency=200, lease_seconds=30.0),
        unsubscribe_key=unsubscribe_key.encode() or None,
        unsubscribe_other_keys=_other_unsubscribe_keys(env),
        bounds=limits.load_bounds(env),
        link_origins=_origins(env, "BELFRY_GATEWAY_LINK_ORIGINS"),
        websocket=env.choice("BELFRY_GATEWAY_WEBSOCKET", "wsproto", WEBSOCKET_IMPLEMENTATIONS),
    )
    env.check()
    return settings


def _other_unsubscribe_keys(env: Env) -> tuple[bytes, ...]:
    """``BELFRY_UNSUBSCRIBE_OTHER_KEYS``: keys links are also accepted under during a rotation."""
    try:
        return unsubscribe.parse_keys(env.str("BELFRY_UNSUBSCRIBE_OTHER_KEYS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_UNSUBSCRIBE_OTHER_KEYS: {exc}")
        return ()


def _origins(env: Env, name: str) -> frozenset[str]:
    """Comma-separated origins (``https://host[:port]``, nothing after it); a problem for anything else."""
    found: set[str] = set()
    for raw in env.str(name, "").split(","):
        origin = raw.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path or parts.query or "@" in origin:
            env.problem(f"{name} entry {origin!r} must be an origin such as https://app.example")
            continue
        found.add(f"{parts.scheme}://{parts.netloc.lower()}")
    return frozenset(found)
