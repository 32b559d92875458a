"""How calls spread over a callee's replicas, and how both ends notice a dead peer: one place for both sides.

A channel resolves every address of its target (``dns:///preferences:50051``
on a headless Service: one A record per ready pod; ``ipv4:a:p,b:q`` for a
fixed list) and sends each call to the next ready one (``round_robin``).
gRPC's default, ``pick_first``, connects to one address and stays there, so
behind a Kubernetes Service a caller used one replica however many ran.

Keepalive pings find a peer that vanished without closing its connections
(a node lost, a network partition) within ``time + timeout``, so the balancer
stops choosing it. Client and server settings must agree, or the server
answers a ping it finds too frequent with GOAWAY "too_many_pings": that is
why both lists live here (``belfry.rpc`` uses both; ``belfry.client`` the
channel side, for producers that do not use the kit).

A channel learns of new replicas only when it resolves its target again,
which gRPC does when a connection closes: servers end each connection after
``MAX_CONNECTION_AGE_MS`` (calls in flight finish on it, new ones go to a
fresh resolution), so a scaled-out callee gets its share within minutes.
"""

from __future__ import annotations

KEEPALIVE_TIME_MS = 30_000  # a ping after this long without any frame from the peer
KEEPALIVE_TIMEOUT_MS = 10_000  # no acknowledgement within this: the connection is dropped
MAX_CONNECTION_AGE_MS = 300_000  # servers close connections this old (gRPC adds ±10 % jitter)

# Every client channel: spread over every resolved address, ping idle connections too.
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Without this, gRPC stops pinging after two pings with no data: an idle channel would stop checking.
    ("grpc.http2.max_pings_without_data", 0),
)

# Every server: accept those pings (the default would call them abuse), age connections out.
SERVER_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
)
