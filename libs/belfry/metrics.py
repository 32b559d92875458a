"""The named Prometheus metrics every service exports, and their endpoint.

A pod running several worker processes (``belfry.processes``) records them in
prometheus_client's multiprocess mode: each worker writes its values to files
under ``PROMETHEUS_MULTIPROC_DIR`` and the parent serves their sum
(``pod_registry``) on the one metrics port.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

RPC_REQUESTS = Counter("belfry_rpc_requests_total", "RPCs handled", ["service", "method", "code"])
RPC_ERRORS = Counter("belfry_rpc_errors_total", "RPCs that ended in an error status", ["service", "method", "code"])
RPC_LATENCY = Histogram("belfry_rpc_seconds", "RPC handling time", ["service", "method"])
EVENTS_PUBLISHED = Counter("belfry_events_published_total", "Events accepted by the dispatcher", ["outcome"])
# ``outcome`` of the delivery metrics: sent | retry | fail | dropped, the one vocabulary of
# ``belfry.queue.worker.OUTCOMES`` (docs/observability.md lists every name and label).
DELIVERIES = Counter("belfry_deliveries_total", "Delivery attempts by their outcome", ["channel", "outcome"])
# Every worker's queue upkeep measures the same table: across a pod's workers, the latest reading of a live one.
QUEUE_DEPTH = Gauge(
    "belfry_queue_depth", "Deliveries waiting to be sent", ["channel"], multiprocess_mode="livemostrecent"
)
QUEUE_AGE = Gauge(
    "belfry_queue_oldest_age_seconds",
    "Age of the oldest waiting delivery",
    ["channel"],
    multiprocess_mode="livemostrecent",
)
# Observed when a sender records an outcome: from the delivery's creation (its fan-out) to then.
END_TO_END = Histogram(
    "belfry_end_to_end_seconds",
    "From a delivery's creation to its recorded outcome",
    ["channel", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)


def serve_metrics(address: str, registry: CollectorRegistry = REGISTRY) -> int:
    """Start the /metrics endpoint on ``host:port`` (port 0 = any); return the port, or 0 when disabled."""
    if address in {"", "off", "none"}:
        return 0
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)  # noqa: S104 - scraped from inside the cluster
    return int(server.server_port)


def pod_registry(directory: str) -> CollectorRegistry:
    """A registry holding the sum of every worker's metrics written under ``directory`` (counters and
    histograms of exited workers included, so totals never go back; gauges of live workers only)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]  # untyped library
    return registry
