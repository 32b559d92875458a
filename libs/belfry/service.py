"""The one shape every service has: build → start (tests, port 0) → run (processes).

A service package provides ``settings.load_settings(environ)``,
``server.build_for(settings)`` returning what builds a :class:`Built`, and
``migrations/*.sql``; ``start`` opens the pool, binds the gRPC server and
starts the background loops, and ``main`` is what its ``__main__`` calls.
Tests start the very same servers in-process on port 0.

Services declare themselves (:class:`Declaration`, in ``services/__init__.py``);
the kit iterates over :func:`declared` and never names a service.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health, health_pb2

from belfry import auth, background, db, log, metrics, processes, rpc
from belfry.config import CommonSettings
from belfry.errors import ConfigError

_LOG = log.get(__name__)

# A background loop runs until its stop event is set (sender workers, schedulers).
Background = background.Loop

# The cyclic garbage collector's generation thresholds once a service is up
# (CPython's default is 700/10/10). Request handling allocates many short-lived
# objects and few cycles: collecting gen 0 every 700 allocations took 18 % of
# the dispatcher's busy samples.
_GC_THRESHOLDS = (20_000, 20, 20)

# How often readiness checks the database, and how long one check may take.
_READINESS_SECONDS = 1.0
_READINESS_TIMEOUT = 2.0


# The package whose ``SERVICES`` declares the deployment's services.
_REGISTRY = "services"


class HasCommon(Protocol):
    """Service settings embed the common block."""

    @property
    def common(self) -> CommonSettings:
        """The settings every service shares."""


S = TypeVar("S", bound=HasCommon)


@dataclass(frozen=True)
class Declaration:
    """A service as the kit sees it: ``belfry up``, ``belfry serve`` and ``belfry migrate`` iterate over these.

    Plain data, so reading the declarations imports no service's code: the
    package holds the rest (``__main__``, the settings loader and build
    function it passes to :func:`main`, ``migrations/*.sql``).
    """

    name: str
    port: int  # default gRPC port (a bare process, the local mesh, the Kubernetes manifests)
    package: str  # e.g. "services.email"


def declared() -> tuple[Declaration, ...]:
    """Every service, in start order (what others call comes first), as the registry package declares them."""
    found: tuple[Declaration, ...] = importlib.import_module(_REGISTRY).SERVICES
    return found


def declaration(name: str) -> Declaration:
    """The declared service called ``name``; ConfigError names the known ones."""
    for d in declared():
        if d.name == name:
            return d
    raise ConfigError(f"unknown service {name!r}; one of: {', '.join(d.name for d in declared())}")


@dataclass
class Built:
    """What a service contributes: servicers, their names, background loops, cleanup."""

    registrations: Sequence[rpc.Registration] = ()
    service_names: Sequence[str] = ()
    background: Sequence[Background] = ()
    cleanup: Sequence[Callable[[], Awaitable[None]]] = ()


@dataclass
class Running:
    """A started service: its port, pool and loops; ``stop()`` drains it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    pool: asyncpg.Pool
    built: Built
    owns_pool: bool = True
    probe: grpc.aio.Server | None = None  # plaintext health-only server for kubelet probes
    probe_port: int = 0
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop routing, stop loops, drain RPCs, close resources."""
        await self.health.enter_graceful_shutdown()
        self.stop_event.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.stop(grace)
        if self.probe is not None:
            await self.probe.stop(0)
        for cleanup in self.built.cleanup:
            await cleanup()
        if self.owns_pool:
            await self.pool.close()


async def start(
    name: str,
    common: CommonSettings,
    build: Callable[[asyncpg.Pool], Awaitable[Built]],
    *,
    pool: asyncpg.Pool | None = None,
) -> Running:
    """Open the pool, build the service, bind and start its server and loops."""
    own_pool = pool or await db.create_pool(
        common.database_url, application_name=f"belfry-{name}", min_size=common.db_pool_min, max_size=common.db_pool_max
    )
    built = await build(own_pool)
    shared = common.process_slot is not None  # one of a pod's workers: its ports are the pod's
    server, port, health_servicer = await rpc.create_server(
        name,
        built.registrations,
        built.service_names,
        common.grpc_address,
        common.tls,
        gate=rpc.gate_for(common),
        user_tokens=_user_tokens(common),
        reflection_on=common.grpc_reflection,
        reuse_port=shared,
    )
    await server.start()
    running = Running(server, port, health_servicer, own_pool, built, owns_pool=pool is None)
    if common.health_address:
        running.probe, running.probe_port = await rpc.create_health_server(
            common.health_address, health_servicer, reuse_port=shared
        )

    def spawn(loop: Background) -> asyncio.Task[None]:
        # A failing loop is restarted with backoff: one bad row or a database
        # restart must not take the whole service (and its RPCs) down.
        name = getattr(loop, "__qualname__", repr(loop))
        return asyncio.create_task(background.keep_running(name, loop, running.stop_event))

    readiness = _readiness(own_pool, health_servicer, [*built.service_names, ""])
    running.tasks = [spawn(loop) for loop in [readiness, *built.background]]
    return running


def _user_tokens(common: CommonSettings) -> auth.TokenVerifier | None:
    """The process's user-token verifier, or None for a service configured without one (it verifies none)."""
    try:
        return auth.user_tokens(common)
    except ConfigError:
        return None


def _readiness(pool: asyncpg.Pool, health_servicer: health.aio.HealthServicer, names: Sequence[str]) -> Background:
    """A loop that reports NOT_SERVING while the database is unreachable, SERVING once it answers again.

    Kubernetes then routes callers to replicas that can do the work, and the
    process stays up to resume by itself: nothing here restarts anything.
    """
    state = {"serving": True}

    async def check() -> None:
        try:
            async with asyncio.timeout(_READINESS_TIMEOUT):
                await pool.fetchval("select 1")
        except Exception as exc:
            if not db.is_disconnect(exc):
                raise
            serving = False
            problem = repr(exc)
        else:
            serving, problem = True, ""
        if serving == state["serving"]:
            return
        state["serving"] = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await health_servicer.set(name, status)
        if serving:
            _LOG.info("database reachable again; serving")
        else:
            _LOG.warning("database unreachable; not serving until it answers", error=problem)

    async def loop(stop: asyncio.Event) -> None:
        await background.every("database readiness", _READINESS_SECONDS, check, stop)

    return loop


def tune_gc() -> None:
    """The collector as every service process runs it, once started (bench scripts that host a service's loop too).

    What start-up made (modules, generated message classes, settings) lives as long as the process:
    it is moved out of the collector's view, so each collection walks only what requests made.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


async def _run(name: str, common: CommonSettings, build: Callable[[asyncpg.Pool], Awaitable[Built]]) -> None:
    import signal  # noqa: PLC0415 - only processes (not tests) handle signals

    metrics_port = metrics.serve_metrics(common.metrics_address)
    running = await start(name, common, build)
    tune_gc()
    # Handlers first: a supervisor may send SIGTERM as soon as it reads the line below.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.stop_event.set)
    processes.watch_parent(running.stop_event.set)  # a pod's worker drains when its parent is gone
    # Supervisors (``belfry up``, tests) read the bound port from this line.
    _LOG.info("serving", port=running.port, metrics_port=metrics_port)
    print(f"BELFRY_READY {name} {running.port}", file=sys.stderr, flush=True)  # noqa: T201
    await running.stop_event.wait()
    _LOG.info("draining", seconds=common.drain_seconds)
    await running.stop(common.drain_seconds)
    _LOG.info("stopped")


def main(
    name: str,
    load: Callable[[Mapping[str, str]], S],
    build_for: Callable[[S], Callable[[asyncpg.Pool], Awaitable[Built]]],
    *,
    listeners: Callable[[S], Sequence[processes.Listener]] | None = None,
) -> None:
    """Entry point of ``python -m services.<name>``: settings, logging, uvloop, run.

    With ``BELFRY_PROCESSES`` above one this process runs the pod's workers
    instead (``belfry.processes``); ``listeners`` names the ports the service
    binds besides gRPC and the probe port, which the workers share too.
    """
    try:
        settings = load(os.environ)
    except ConfigError as exc:
        print(f"belfry-{name}: {exc.message}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from exc
    common = settings.common
    log.configure(service=name, level=common.log_level, json=common.log_json)
    if common.process_slot is not None:
        structlog.contextvars.bind_contextvars(process=common.process_slot)  # which of the pod's workers logged
    elif common.processes > 1:
        command = [sys.executable, "-m", declaration(name).package]
        shared = listeners(settings) if listeners is not None else ()
        raise SystemExit(asyncio.run(processes.run_pod(name, common, command, shared)))
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.install()
    asyncio.run(_run(name, common, build_for(settings)))
