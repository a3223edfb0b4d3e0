"""The executor: pulls its pool's work and runs each firing in a warm worker process.

Every executor of a pool shares one durable consumer (``executor-<pool>`` on ``pb.work.<pool>``), so
adding executors adds throughput. An executor asks JetStream for exactly as many work items as it has
free workers (the pull consumer's credits), runs each in a worker (``pool.py``), writes the outcome to
the session's log and only then acks (``firing.py``).

The consumer redelivers without limit (``max_deliver=-1``): the executor that receives a delivery decides
from the log whether the firing runs, is retried later (a nak with the back-off delay), or has ended
with no outcome too often (``PETRIBUS_MAX_DELIVER`` runs lost to dead executors) and fails for good, so
its markers come back. Nothing depends on an advisory that no executor may be there to hear.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

from nats.js.api import AckPolicy, ConsumerConfig

from petribus import subjects
from petribus.bus import EventLog
from petribus.consumer import PullConsumer
from petribus.files import FileStore
from petribus.loader import load_bot
from petribus.net import Net
from petribus.service import Service
from petribus.settings import Settings
from petribus_executor.firing import FiringRunner
from petribus_executor.interact import Interactions
from petribus_executor.pool import WorkerPool


class Executor(Service):
    name = "executor"

    def __init__(self, settings: Settings, apps: list[str], *, pool: str | None = None,
                 instance: str | None = None) -> None:
        super().__init__(settings)
        self.apps = list(apps)
        self.pool = pool or settings.pool
        nets = [load_bot(spec).net() for spec in self.apps]
        self.nets: dict[str, Net] = {n.bot: n for n in nets}
        self.instance = instance or (
            f"executor-{self.pool}@{socket.gethostname()}:{os.getpid()}.{uuid.uuid4().hex[:6]}"
        )
        self.durable = subjects.executor_durable(self.pool)
        self.log = self.log.bind(instance=self.instance, pool=self.pool)
        self.workers: WorkerPool | None = None
        self.consumer: PullConsumer | None = None
        self._firings: set[asyncio.Task[None]] = set()
        self._drain_s = 10.0

    async def start(self) -> None:
        nc = await self.connect()
        self.js = nc.jetstream()
        events = EventLog(nc, self.js)
        await self._ensure_consumer()
        self.workers = WorkerPool(self.apps, self.settings.workers,
                                  concurrency=self.settings.worker_concurrency)
        await self.workers.start()
        interactions = Interactions(events, FileStore(self.js, self.settings.max_file_bytes))
        self.runner = FiringRunner(instance=self.instance, nets=self.nets, events=events,
                                   workers=self.workers, ack_wait_s=self.settings.ack_wait_s, log=self.log,
                                   interactions=interactions, max_lost_runs=self.settings.max_deliver,
                                   retry_backoff_s=self.settings.retry_backoff_s,
                                   retry_backoff_max_s=self.settings.retry_backoff_max_s)
        # Enough for every worker to be full (async firings share a worker), plus one outcome per worker
        # being written while the next run starts; sync work beyond free workers waits here, heartbeated.
        self.consumer = PullConsumer(nc, subjects.WORK_STREAM, self.durable,
                                     max_inflight=self.settings.executor_inflight, ensure=self._ensure_consumer)
        await self.consumer.start()
        self.spawn(self._receive(), "receive")
        self.log.info("executor started", bots=sorted(self.nets), workers=self.settings.workers)

    async def _ensure_consumer(self) -> None:
        """Create or update the pool's durable consumer: every executor of the pool runs this at start,
        and again if a fail-over lost it."""
        await self.js.add_consumer(
            subjects.WORK_STREAM,
            ConsumerConfig(
                durable_name=self.durable, filter_subject=subjects.work(self.pool),
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s, max_deliver=-1,
                # Every executor of the pool together may hold this many (JetStream's default is 1,000).
                max_ack_pending=100_000,
            ),
        )

    async def _receive(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(self.consumer.max_inflight):
                task = asyncio.create_task(self.runner.execute(msg),
                                           name=f"firing:{msg.metadata.sequence.stream}")
                self._firings.add(task)
                task.add_done_callback(self._firing_done)

    def _firing_done(self, task: asyncio.Task[None]) -> None:
        self._firings.discard(task)
        if self.consumer is not None and not self._stopping.is_set():
            self.consumer.release()  # a worker is free: ask for one more

    async def drain(self) -> None:
        """Stop pulling, let running firings finish (bounded), then abandon the rest to redelivery."""
        if self.consumer is not None:
            await self.consumer.stop()
        if self._firings:
            self.log.info("draining", running=len(self._firings))
            _, late = await asyncio.wait(list(self._firings), timeout=self._drain_s)
            for task in late:
                task.cancel()  # each naks its work (another executor takes it now) and kills its worker
            if late:
                await asyncio.wait(late)

    async def stop(self, timeout: float = 10.0) -> None:
        # Leave a little of the timeout to hand back late firings and close the workers.
        self._drain_s = max(0.0, timeout - min(2.0, timeout / 4))
        try:
            await super().stop(timeout)
        finally:
            if getattr(self, "runner", None) is not None:
                self.runner.close()
            if self.workers is not None:
                await self.workers.close()


async def run(settings: Settings, apps: list[str], *, pool: str | None = None,
              instance: str | None = None) -> None:
    await Executor(settings, apps, pool=pool, instance=instance).run()
