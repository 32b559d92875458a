"""The named Prometheus metrics every service exports, and their endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter("belfry_rpc_requests_total", "RPCs handled", ["service", "method", "code"])
RPC_ERRORS = Counter("belfry_rpc_errors_total", "RPCs that ended in an error status", ["service", "method", "code"])
RPC_LATENCY = Histogram("belfry_rpc_seconds", "RPC handling time", ["service", "method"])
EVENTS_PUBLISHED = Counter("belfry_events_published_total", "Events accepted by the dispatcher", ["outcome"])
DELIVERIES = Counter("belfry_deliveries_total", "Deliveries finished by a sender", ["channel", "outcome"])
QUEUE_DEPTH = Gauge("belfry_queue_depth", "Deliveries waiting to be sent", ["channel"])
QUEUE_AGE = Gauge("belfry_queue_oldest_age_seconds", "Age of the oldest waiting delivery", ["channel"])
END_TO_END = Histogram(
    "belfry_end_to_end_seconds",
    "From the event's acceptance to its delivery",
    ["channel"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)


def serve_metrics(address: str) -> int:
    """Start the /metrics endpoint on ``host:port`` (port 0 = any); return the port, or 0 when disabled."""
    if address in {"", "off", "none"}:
        return 0
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")  # noqa: S104 - scraped from inside the cluster
    return int(server.server_port)
