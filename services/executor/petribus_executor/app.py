"""The executor: pulls its pool's work and runs each firing in a warm worker process.

Every executor of a pool shares one durable consumer (``executor-<pool>`` on ``pb.work.<pool>``), so
adding executors adds throughput. An executor asks JetStream for exactly as many work items as it has
free workers (the pull consumer's credits), runs each in a worker (``pool.py``), writes the outcome to
the session's log and only then acks (``firing.py``). Work that exhausts its deliveries (executors kept
dying on it) is failed for good from the consumer's max-deliveries advisory, so its markers come back.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from petribus import subjects
from petribus.bus import EventLog
from petribus.consumer import PullConsumer
from petribus.files import FileStore
from petribus.loader import load_bot
from petribus.net import Net
from petribus.service import Service
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_executor.firing import FiringRunner
from petribus_executor.interact import Interactions
from petribus_executor.pool import WorkerPool

MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"


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
        self._giving_up: set[asyncio.Task[None]] = set()
        self._drain_s = 10.0

    async def start(self) -> None:
        nc = await self.connect()
        self.js = nc.jetstream()
        events = EventLog(nc, self.js)
        await self.js.add_consumer(  # create or update: every executor of the pool may run this at start
            subjects.WORK_STREAM,
            ConsumerConfig(
                durable_name=self.durable, filter_subject=subjects.work(self.pool),
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s,
                max_deliver=self.settings.max_deliver,
            ),
        )
        self.workers = WorkerPool(self.apps, self.settings.workers)
        await self.workers.start()
        interactions = Interactions(events, FileStore(self.js, self.settings.max_file_bytes))
        self.runner = FiringRunner(instance=self.instance, nets=self.nets, events=events,
                                   workers=self.workers, ack_wait_s=self.settings.ack_wait_s, log=self.log,
                                   interactions=interactions)
        self._advisories = await nc.subscribe(
            MAX_DELIVERIES_ADVISORY.format(stream=subjects.WORK_STREAM, consumer=self.durable),
            queue=self.durable, cb=self._on_advisory,
        )
        # Twice the workers: while one firing's outcome is being written to the log, the next one
        # already runs. More would hold work that an idle executor of the pool could take.
        self.consumer = PullConsumer(nc, subjects.WORK_STREAM, self.durable,
                                     max_inflight=2 * self.settings.workers)
        await self.consumer.start()
        self.spawn(self._receive(), "receive")
        self.log.info("executor started", bots=sorted(self.nets), workers=self.settings.workers)

    async def _receive(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(2 * self.settings.workers):
                task = asyncio.create_task(self.runner.execute(msg),
                                           name=f"firing:{msg.metadata.sequence.stream}")
                self._firings.add(task)
                task.add_done_callback(self._firing_done)

    def _firing_done(self, task: asyncio.Task[None]) -> None:
        self._firings.discard(task)
        if self.consumer is not None and not self._stopping.is_set():
            self.consumer.release()  # a worker is free: ask for one more

    async def _on_advisory(self, advisory: Msg) -> None:
        # Handled in a task of our own so that a graceful stop can wait for it to finish.
        task = asyncio.create_task(self._gave_up(advisory), name="gave-up")
        self._giving_up.add(task)
        task.add_done_callback(self._giving_up.discard)

    async def _gave_up(self, advisory: Msg) -> None:
        """JetStream stopped redelivering a work item: fail its firing for good so its markers return."""
        try:
            info = json.loads(advisory.data)
            seq = int(info["stream_seq"])
            deliveries = int(info.get("deliveries") or self.settings.max_deliver)
            try:
                raw = await self.js.get_msg(subjects.WORK_STREAM, seq)
            except NotFoundError:
                return  # someone finished it after all
            item = WorkItem.model_validate_json(raw.data or b"")
            await self.runner.give_up(
                item, f"no executor finished the firing in {deliveries} deliveries (each one timed out or "
                      "its executor died); raise PETRIBUS_MAX_DELIVER or look at the executors' logs",
                deliveries,
            )
            await self.js.delete_msg(subjects.WORK_STREAM, seq)
        except (ValidationError, ValueError, KeyError) as exc:
            self.log.error("bad max-deliveries advisory ignored", error=repr(exc))
        except Exception as exc:  # the bus is down: the item stays in the stream, visible to an operator
            self.log.error("could not fail an abandoned work item", error=repr(exc), exc_info=exc)

    async def drain(self) -> None:
        """Stop pulling, let running firings finish (bounded), then abandon the rest to redelivery."""
        if self.consumer is not None:
            await self.consumer.stop()
            await self._advisories.unsubscribe()
        if self._firings:
            self.log.info("draining", running=len(self._firings))
            _, late = await asyncio.wait(list(self._firings), timeout=self._drain_s)
            for task in late:
                task.cancel()  # each naks its work (another executor takes it now) and kills its worker
            if late:
                await asyncio.wait(late)
        if self._giving_up:
            await asyncio.wait(list(self._giving_up))

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
