"""A service as several processes in one pod: one port, supervised workers, one /metrics.

``BELFRY_PROCESSES`` says how many (default: the whole CPUs this process may
run on — its CPU affinity, capped by the container's CPU limit; ``belfry up``
and the tests use 1). With one, the service runs in this process as it always
did. With more, ``belfry.service.main`` runs :func:`run_pod` instead, and
this process becomes the pod's parent, which serves no call itself:

- It binds every port the service listens on — gRPC, the probe port, and
  what the service adds (the gateway's HTTP) — with ``SO_REUSEPORT``, and
  keeps those sockets bound but not listening: a port 0 is resolved once for
  every worker, and the port stays reserved while a worker restarts. The
  kernel hands each new connection to one of the workers' listening sockets
  (by a hash of its addresses), never to the parent's.
- It starts the workers (``python -m <package>``, each told its slot), waits
  for each one's ``BELFRY_READY`` line and prints the pod's one line.
- A worker that exits is started again in its slot after a backoff
  (``belfry.background.Backoff``, reset once it ran for a minute).
- SIGTERM (or SIGINT) is passed to every worker; each drains as a lone
  process does, and the parent exits 0 once all did (SIGKILL for those still
  running after the drain time plus a margin).
- It serves the pod's metrics: workers write theirs under
  ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory under the temporary
  directory unless set; emptied at start), the parent serves their sum.

Workers hold the read end of a pipe whose write end only the parent has: if
the parent dies, even by SIGKILL, the pipe reads end-of-file and the workers
drain and exit instead of serving on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import multiprocess

from belfry import background, log, metrics

if TYPE_CHECKING:
    from belfry.config import CommonSettings

_LOG = log.get(__name__)

PROCESSES = "BELFRY_PROCESSES"
SLOT = "BELFRY_PROCESS_SLOT"  # set by the parent in each worker: 0 .. processes - 1
LIFELINE = "BELFRY_PROCESS_LIFELINE"  # set by the parent: a descriptor that reads end-of-file once it is gone
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# A worker that ran this long before exiting restarts after the shortest backoff again.
STABLE_SECONDS = 60.0
# SIGKILL for a worker still running this long after its drain time.
KILL_MARGIN_SECONDS = 5.0

_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Listener:
    """A port every worker listens on besides gRPC and the probe port (the gateway's HTTP)."""

    host: str
    port: int  # 0: any, resolved by the parent
    variable: str  # the environment variable the service reads the port from


def cpu_quota(cpu_max: str) -> float | None:
    """The CPUs a cgroup v2 ``cpu.max`` allows (``"200000 100000"`` → 2.0), None for ``"max ..."``."""
    quota, _, period = cpu_max.strip().partition(" ")
    try:
        q, p = int(quota), int(period or "100000")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_group(version_field: str) -> str:
    """This process's cgroup path in a hierarchy of /proc/self/cgroup (``"0::/..."`` is v2)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            number, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if (number == "0" and version_field == "") or version_field in controllers.split(","):
                return path.lstrip("/")
    return ""


def _cgroup_cpus(root: Path) -> float | None:
    """The container's CPU limit, from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited."""
    for path in (root / _own_group("") / "cpu.max", root / "cpu.max"):
        with contextlib.suppress(OSError):
            return cpu_quota(path.read_text())
    for folder in (root / "cpu" / _own_group("cpu"), root / "cpu"):
        with contextlib.suppress(OSError, ValueError):
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus(cgroup_root: Path = _CGROUP) -> int:
    """Whole CPUs this process may use: its CPU affinity, capped by the container's CPU limit (at least 1).

    A fractional limit rounds down (1.5 CPUs: one process), so the workers
    never outnumber the CPUs they are allowed to keep busy.
    """
    cpus = len(os.sched_getaffinity(0))
    limit = _cgroup_cpus(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def watch_parent(on_gone: Callable[[], None], environ: dict[str, str] | None = None) -> None:
    """In a pod's worker: call ``on_gone`` once the parent is gone (its lifeline reads end-of-file)."""
    raw = (os.environ if environ is None else environ).get(LIFELINE, "")
    if not raw.isdigit():
        return
    fd = int(raw)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        loop.remove_reader(fd)
        _LOG.warning("the pod's parent process is gone; draining")
        on_gone()

    loop.add_reader(fd, readable)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _reserve(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT, without listening: the port resolved and kept for the workers."""
    bare = host.strip("[]") or "0.0.0.0"  # noqa: S104 - the same default the service binds
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as gRPC binds [::]
        sock.bind((bare, port))
    except OSError:
        sock.close()
        raise
    return sock


def _announce(worker: _Worker) -> Callable[[asyncio.Future[None]], None]:
    """A callback logging a restarted worker's readiness (its failure shows as its next exit)."""

    def done(ready: asyncio.Future[None]) -> None:
        if not ready.cancelled() and ready.exception() is None:
            _LOG.info("worker ready", slot=worker.slot, pid=worker.process.pid)

    return done


class WorkerDied(RuntimeError):
    """A worker exited before it reported ready."""


@dataclass
class _Worker:
    slot: int
    process: asyncio.subprocess.Process
    ready: asyncio.Future[None]
    pump: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)


class _Pod:
    """The parent's view of its workers: spawn, keep alive, drain."""

    def __init__(self, command: Sequence[str], env: dict[str, str], count: int, stop: asyncio.Event) -> None:
        self.command = list(command)
        self.env = env
        self.metrics_dir = env[METRICS_DIR]
        self.count = count
        self.stop = stop
        self.worker_id = env.get("BELFRY_WORKER_ID", "")
        self.workers: list[_Worker] = []
        self.lifeline_read, self.lifeline_write = os.pipe()

    async def spawn(self, slot: int) -> _Worker:
        env = dict(self.env)
        env[SLOT] = str(slot)
        env[LIFELINE] = str(self.lifeline_read)
        if self.worker_id:
            # Leases, error histories and the gateway's presence rows name a worker: one name each.
            env["BELFRY_WORKER_ID"] = f"{self.worker_id}-{slot}"
        process = await asyncio.create_subprocess_exec(
            *self.command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(self.lifeline_read,),
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved here so an unawaited failure is not reported as "never retrieved".
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        return _Worker(slot, process, ready, asyncio.create_task(self._pump(slot, process, ready)))

    @staticmethod
    async def _pump(slot: int, process: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        """Pass the worker's stderr on, except its readiness line, which the pod reports once for all."""
        assert process.stderr is not None
        async for raw in process.stderr:
            if raw.startswith(b"BELFRY_READY ") and not ready.done():
                ready.set_result(None)
                continue
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
        if not ready.done():
            ready.set_exception(WorkerDied(f"worker {slot} exited with code {await process.wait()} before ready"))

    async def start(self) -> bool:
        """Start every worker; True once all are ready, False when one died first or a stop came."""
        self.workers = [await self.spawn(slot) for slot in range(self.count)]
        everyone = asyncio.gather(*(w.ready for w in self.workers))
        stopping = asyncio.ensure_future(self.stop.wait())
        either: list[asyncio.Future[Any]] = [everyone, stopping]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not everyone.done():
            everyone.cancel()
            return False
        if everyone.exception() is not None:
            _LOG.error("a worker did not start; stopping the pod", error=str(everyone.exception()))
            return False
        return True

    async def keep(self, slot: int) -> None:
        """Until the stop, start the worker of ``slot`` again whenever it exits."""
        delays = background.Backoff(base=0.5, cap=30.0)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                worker = self.workers[slot]
                exited = asyncio.ensure_future(worker.process.wait())
                await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
                if self.stop.is_set():
                    exited.cancel()
                    return
                self.forget(worker.process.pid)
                if time.monotonic() - worker.started >= STABLE_SECONDS:
                    delays.reset()
                wait = delays.next()
                _LOG.warning(
                    "worker exited; starting it again",
                    slot=slot,
                    pid=worker.process.pid,
                    code=worker.process.returncode,
                    retry_in=round(wait, 2),
                )
                if await background.sleep(self.stop, wait):
                    return
                fresh = await self.spawn(slot)
                self.workers[slot] = fresh
                fresh.ready.add_done_callback(_announce(fresh))
        finally:
            stopping.cancel()

    async def drain(self, seconds: float) -> bool:
        """SIGTERM every running worker and wait; True when each of them exited 0 within ``seconds``."""
        running = [w for w in self.workers if w.process.returncode is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + seconds
        clean = True
        for worker in running:
            try:
                await asyncio.wait_for(worker.process.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
            # A worker stopped before it was ready had nothing to drain.
            if worker.process.returncode != 0 and worker.ready.done() and not worker.ready.exception():
                clean = False
                _LOG.warning("worker did not drain cleanly", slot=worker.slot, code=worker.process.returncode)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.pump, 5)
            self.forget(worker.process.pid)
        return clean

    def forget(self, pid: int) -> None:
        """Drop an exited worker's live gauges (its counters and histograms stay: totals never go back)."""
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]  # untyped library

    def close(self) -> None:
        os.close(self.lifeline_write)
        os.close(self.lifeline_read)


def _metrics_dir(name: str, given: str) -> tuple[Path, bool]:
    """The directory the workers write metrics to, emptied; and whether this process made it."""
    if not given:
        return Path(tempfile.mkdtemp(prefix=f"belfry-{name}-metrics-")), True
    directory = Path(given)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # a previous run's values would be added to this one's
        stale.unlink()
    return directory, False


async def run_pod(name: str, common: CommonSettings, command: Sequence[str], listeners: Sequence[Listener] = ()) -> int:
    """Run ``common.processes`` workers of the service ``command`` starts; the exit status of the pod."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    env = dict(os.environ)
    reserved: list[socket.socket] = []

    def reserve(host: str, port: int) -> int:
        reserved.append(_reserve(host, port))
        bound: int = reserved[-1].getsockname()[1]
        return bound

    directory, made = _metrics_dir(name, env.get(METRICS_DIR, ""))
    pod: _Pod | None = None
    try:
        host, port = _split(common.grpc_address)
        port = reserve(host, port)
        env["BELFRY_GRPC_ADDRESS"] = f"{host}:{port}"
        if common.health_address:
            probe_host, probe_port = _split(common.health_address)
            env["BELFRY_HEALTH_ADDRESS"] = f"{probe_host}:{reserve(probe_host, probe_port)}"
        for listener in listeners:
            env[listener.variable] = str(reserve(listener.host, listener.port))
        env[METRICS_DIR] = str(directory)
        env["BELFRY_METRICS_ADDRESS"] = "off"  # the parent serves the pod's sum
        metrics_port = metrics.serve_metrics(common.metrics_address, metrics.pod_registry(str(directory)))
        pod = _Pod(command, env, common.processes, stop)
        started = await pod.start()
        if started:
            pids = [w.process.pid for w in pod.workers]
            _LOG.info("serving", port=port, metrics_port=metrics_port, processes=common.processes, pids=pids)
            print(f"BELFRY_READY {name} {port}", file=sys.stderr, flush=True)  # noqa: T201
            await asyncio.gather(*(pod.keep(slot) for slot in range(common.processes)))
            _LOG.info("draining", seconds=common.drain_seconds)
        clean = await pod.drain(common.drain_seconds + KILL_MARGIN_SECONDS)
        _LOG.info("stopped")
        return 0 if clean and (started or stop.is_set()) else 1
    finally:
        if pod is not None:
            pod.close()
        for sock in reserved:
            sock.close()
        if made:
            shutil.rmtree(directory, ignore_errors=True)
