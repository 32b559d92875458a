"""Real service processes for fault tests: started as ``python -m services.<name>``, killed at will.

A service prints ``BELFRY_READY <name> <port>`` on stderr once it serves
(``belfry.service``); ``ServiceProcess.start`` waits for that line, keeps the
last lines of its logs and stderr for failure messages, and exposes the
process's gRPC health.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ProcessDied(AssertionError):
    """A service process exited when the test expected it alive."""


@dataclass
class ServiceProcess:
    """One running service process and the tail of what it wrote."""

    name: str
    process: asyncio.subprocess.Process
    port: int = 0
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    _pump: asyncio.Task[None] | None = field(default=None, repr=False)
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, name: str, env: dict[str, str], *, ready_within: float = 60.0) -> ServiceProcess:
        """Spawn ``python -m services.<name>`` with exactly ``env``; return once it reported its port."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{name}",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        child = cls(name, process)
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def read(stream: asyncio.StreamReader | None) -> None:
            assert stream is not None
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if line.startswith("BELFRY_READY ") and not ready.done():
                    ready.set_result(int(line.split()[-1]))
                child.lines.append(line)

        async def pump() -> None:
            # Logs go to stdout, the readiness line and tracebacks to stderr: keep both, interleaved.
            await asyncio.gather(read(process.stdout), read(process.stderr))
            if not ready.done():
                ready.set_exception(ProcessDied(f"{name} exited with {await process.wait()}:\n{child.tail()}"))

        child._pump = asyncio.create_task(pump())
        try:
            child.port = await asyncio.wait_for(asyncio.shield(ready), ready_within)
        except BaseException:
            await child.kill()
            raise
        return child

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.process.returncode is None

    def assert_alive(self) -> None:
        """Fail with the process's last output when it exited."""
        if not self.alive:
            raise ProcessDied(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The last lines the process wrote (logs and stderr)."""
        return "\n".join(list(self.lines)[-lines:])

    async def health(self, service: str = "") -> int | None:
        """The serving status the process reports over gRPC health (None when it does not answer)."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)

    async def wait_health(self, status: int, *, within: float = 30.0, every: float = 0.05) -> list[int | None]:
        """Poll health until it reports ``status``; return every status seen (raises if it never does)."""
        seen: list[int | None] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            self.assert_alive()
            now = await self.health()
            if not seen or seen[-1] != now:
                seen.append(now)
            if now == status:
                return seen
            await asyncio.sleep(every)
        names = [health_pb2.HealthCheckResponse.ServingStatus.Name(s) if s is not None else "no answer" for s in seen]
        raise AssertionError(
            f"{self.name} never reported {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} "
            f"(saw {names}):\n{self.tail()}"
        )

    async def kill(self) -> None:
        """SIGKILL and reap."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self._finish()

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds (then SIGKILL); return the exit code."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGKILL)
        await self._finish()
        return int(self.process.returncode or 0)

    async def _finish(self) -> None:
        await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
