"""The shape every service shares: an async context manager with one ``run()``.

``start()`` connects and starts the service's tasks; ``stop()`` drains them within a timeout; ``run()``
starts, waits for SIGINT/SIGTERM (or ``request_stop()``) or a task failure, then stops. A task that
dies takes the service down loudly instead of leaving it half alive.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS

from petribus import bus, logs, metrics
from petribus.bus_auth import ClientAuth
from petribus.settings import Settings


# The cyclic collector of a long-running process, once it has loaded what it runs (see ``settle_collector``).
GC_THRESHOLDS = (10_000, 20, 50)


def settle_collector(*, collect: bool = True) -> None:
    """Tune the cyclic garbage collector for a long-running process that has loaded what it runs.

    Everything made until now (modules, pydantic's schemas, the bots: most of the heap) is frozen out of
    every collection, and the young generation is collected every 10,000 objects instead of 700 (the
    older ones every 20 and 50 of those). Measured on the sustained firings of ``bench/bench_core.py``:
    the scheduler spent a quarter of its CPU in the collector, 0.7 s of it in six full collections of
    100 ms or more, each walking what start-up had made; with this, 0.3 s in all (docs/benchmarks.md).
    Reference cycles are still collected, only in larger batches. ``collect=False``: freeze what is there
    without a full collection first (a process forked from a settled one, where that was done).
    """
    if collect:
        gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Service:
    name = "service"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = logs.get(f"petribus.{self.name}")
        self.nc: NATS | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._failed: BaseException | None = None
        self.metrics_server: metrics.MetricsServer | None = None  # PETRIBUS_METRICS_PORT, when set

    async def connect(self) -> NATS:
        # As the user of this service's role: on a closed bus the server refuses what the role never does.
        auth = ClientAuth.from_settings(self.settings, self.name)
        self.nc = await bus.connect(self.settings.nats_url, name=f"petribus-{self.name}", auth=auth)
        await bus.ensure_streams(self.nc.jetstream(), duplicate_window_s=self.settings.duplicate_window_s,
                                 replicas=self.settings.replicas)
        self.metrics_server = await metrics.watch(self)
        return self.nc

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a supervised task: if it fails, the service stops and ``run()`` re-raises."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("task failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._failed = self._failed or exc
            self._stopping.set()

    async def start(self) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        """Finish in-flight work before tasks are cancelled. Services override it where that matters."""

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        try:
            await asyncio.wait_for(self.drain(), timeout)
        except asyncio.TimeoutError:
            self.log.warning("drain timed out", timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # closing anyway
                await self.nc.close()
        await metrics.unwatch(self)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()
        if self._failed is not None:
            raise self._failed

    async def run(self, handle_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> "Service":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
