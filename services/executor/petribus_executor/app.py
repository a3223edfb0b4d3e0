"""The executor: pulls its pool's work and runs each firing in a warm worker process.

Every executor of a pool shares one durable consumer (``executor-<pool>`` on ``pb.work.<pool>``), so
adding executors adds throughput. An executor asks JetStream for exactly as many work items as it has
free workers (the pull consumer's credits), runs each in a worker (``pool.py``), writes the outcome to
the session's log and only then acks (``firing.py``).

The consumer redelivers without limit (``max_deliver=-1``): the executor that receives a delivery decides
from the log whether the firing runs, is retried later (a nak with the back-off delay), or has ended
with no outcome too often (``PETRIBUS_MAX_DELIVER`` runs lost to dead executors) and fails for good, so
its markers come back. Nothing depends on an advisory that no executor may be there to hear.

Pools and devices (``docs/pools.md``): one executor may serve several pools, each through its own
durable consumer and receive loop; the workers are shared. A GPU pool (``gpu``, ``gpu-<type>``) needs
devices (``devices.py``): an executor without them refuses to start rather than take GPU work it could
only fail, and it takes at most as many of a GPU pool's work items as it has devices, so a queue of GPU
work is spread over every executor with free devices instead of waiting behind one. The executor
reports itself (pools, labels, devices, load) to the registry (``petribus.registry``) every
``PETRIBUS_REGISTRY_HEARTBEAT_S`` and leaves it when it stops.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import socket
import time
import uuid

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

import petribus
from petribus import subjects
from petribus.consumer import PullConsumer
from petribus.deletion import GuardedEventLog, Tombstones
from petribus.errors import PetribusError
from petribus.files import FileStore
from petribus.loader import load_bot
from petribus.net import Net
from petribus.registry import DeviceInfo, ExecutorInfo, PoolLoad, Reporter, check_pool_name, is_gpu_pool
from petribus.service import Service
from petribus.settings import Settings
from petribus_executor.devices import Device, DeviceAllocator, discover
from petribus_executor.firing import FiringRunner
from petribus_executor.landed import Landed
from petribus_executor.interact import Interactions
from petribus_executor.pool import WorkerPool


class Executor(Service):
    name = "executor"

    def __init__(self, settings: Settings, apps: list[str], *, pool: str | None = None,
                 pools: list[str] | None = None, labels: dict[str, str] | None = None,
                 devices: list[Device] | None = None, instance: str | None = None,
                 scoped: bool = False) -> None:
        super().__init__(settings)
        self.apps = list(apps)
        nets = [load_bot(spec).net() for spec in self.apps]
        self.nets: dict[str, Net] = {n.bot: n for n in nets}
        found = discover(settings.gpus) if devices is None else devices
        self.devices = DeviceAllocator(found)
        self.pools = serve_pools(settings, pools or ([pool] if pool else None), self.devices)
        self.pool = self.pools[0]  # the first, for logs and the instance id
        self.labels = {**parse_labels(settings.labels), **(labels or {})}
        self.instance = instance or (
            f"executor-{'+'.join(self.pools)}@{socket.gethostname()}:{os.getpid()}.{uuid.uuid4().hex[:6]}"
        )
        # Scoped: this executor's consumers take only its bots' work (one per pool and bot), as the
        # executors of one deployed version do; otherwise one consumer per pool, shared by every bot.
        if scoped and len(self.nets) != 1:
            raise ValueError(f"a scoped executor runs exactly one bot, not {sorted(self.nets)}")
        self.scope = next(iter(self.nets)) if scoped else None
        self.durable = subjects.executor_durable(self.pool, self.scope)
        self.log = self.log.bind(instance=self.instance, pool=",".join(self.pools))
        self.workers: WorkerPool | None = None
        self.consumers: dict[str, PullConsumer] = {}
        self.held: dict[str, int] = {p: 0 for p in self.pools}
        self.reporter: Reporter | None = None
        self._firings: set[asyncio.Task[None]] = set()
        self._drain_s = 10.0
        self._started_at = time.time()

    @property
    def consumer(self) -> PullConsumer | None:
        """The first pool's consumer (one-pool executors, and the tests written for them)."""
        return self.consumers.get(self.pool)

    async def start(self) -> None:
        nc = await self.connect()
        self.js = nc.jetstream()
        # Every append for a session goes through the tombstone check: a deleted session stays deleted.
        self.tombstones = Tombstones(nc)
        await self.tombstones.start()
        events = GuardedEventLog(nc, self.js, tombstones=self.tombstones)
        for pool in self.pools:
            await self._ensure_consumer(pool)
        self.workers = WorkerPool(self.apps, self.settings.workers,
                                  concurrency=self.settings.worker_concurrency, settings=self.settings)
        await self.workers.start()
        interactions = Interactions(events, FileStore(self.js, self.settings.max_file_bytes))
        extra = {"devices": self.devices} if "devices" in inspect.signature(FiringRunner).parameters else {}
        # Before any work is pulled: a claim stored meanwhile would be missed, and its work wait for the log.
        landed = Landed(nc, self.scope)
        await landed.start()
        extra["landed"] = landed
        self.runner = FiringRunner(instance=self.instance, nets=self.nets, events=events,
                                   workers=self.workers, ack_wait_s=self.settings.ack_wait_s, log=self.log,
                                   interactions=interactions, max_lost_runs=self.settings.max_deliver,
                                   retry_backoff_s=self.settings.retry_backoff_s,
                                   retry_backoff_max_s=self.settings.retry_backoff_max_s, **extra)
        # In the registry before the first work item arrives: a scheduler that sees the pool served
        # must not have told a session it was missing.
        self.reporter = Reporter(self.js, self.describe, heartbeat_s=self.settings.registry_heartbeat_s,
                                 replicas=self.settings.replicas)
        await self.reporter.start()
        for pool in self.pools:
            consumer = PullConsumer(nc, subjects.WORK_STREAM, subjects.executor_durable(pool, self.scope),
                                    max_inflight=self._credits(pool),
                                    ensure=lambda pool=pool: self._ensure_consumer(pool),
                                    handle=functools.partial(self._received, pool))
            self.consumers[pool] = consumer
            await consumer.start()
        self.spawn(self.reporter.run(), "registry")
        self.log.info("executor started", bots=sorted(self.nets), workers=self.settings.workers,
                      pools=self.pools, gpus=[d.id for d in self.devices.devices.values()] or None)

    def _credits(self, pool: str) -> int:
        """Work items of ``pool`` held at once. CPU pools: enough for every worker to be full (async
        firings share a worker), plus one outcome per worker being written while the next run starts;
        sync work beyond free workers waits here, heartbeated. GPU pools: one per device, so the pool's
        queue stays in JetStream for whichever executor has devices free."""
        if is_gpu_pool(pool):
            return max(1, self.devices.total)
        return self.settings.executor_inflight

    async def _ensure_consumer(self, pool: str | None = None) -> None:
        """Create or update a pool's durable consumer: every executor of the pool runs this at start,
        and again if a fail-over lost it."""
        pool = pool or self.pool
        await self.js.add_consumer(
            subjects.WORK_STREAM,
            ConsumerConfig(
                durable_name=subjects.executor_durable(pool, self.scope),
                filter_subject=subjects.work(pool) if self.scope is None else subjects.bot_work(pool, self.scope),
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s, max_deliver=-1,
                # Every executor of the pool together may hold this many (JetStream's default is 1,000).
                max_ack_pending=100_000,
            ),
        )

    def _received(self, pool: str, msg: Msg) -> None:
        """A work item, as the connection reads it (``PullConsumer.handle``): its firing starts at once
        (also while the consumer winds down: ``drain`` waits for it)."""
        task = asyncio.get_running_loop().create_task(self.runner.execute(msg),
                                                      name=f"firing:{pool}:{msg.metadata.sequence.stream}")
        self._firings.add(task)
        self.held[pool] += 1
        task.add_done_callback(functools.partial(self._firing_done, pool=pool, consumer=self.consumers[pool]))

    def _firing_done(self, task: asyncio.Task[None], *, pool: str, consumer: PullConsumer) -> None:
        self._firings.discard(task)
        self.held[pool] -= 1
        if not self._stopping.is_set():
            consumer.release()  # a worker is free: ask for one more

    def describe(self) -> ExecutorInfo:
        """This executor as the registry shows it."""
        return ExecutorInfo(
            instance=self.instance, pools=list(self.pools), labels=dict(self.labels),
            devices=[DeviceInfo(**d) for d in self.devices.describe()], workers=self.settings.workers,
            load={p: PoolLoad(capacity=self._credits(p), running=self.held[p]) for p in self.pools},
            running=len(self._firings), version=petribus.__version__, bots=sorted(self.nets),
            host=socket.gethostname(),
            pid=os.getpid(), started_at=self._started_at,
        )

    async def drain(self) -> None:
        """Stop pulling, let running firings finish (bounded), then abandon the rest to redelivery."""
        for consumer in self.consumers.values():
            await consumer.stop()
        if self._firings:
            self.log.info("draining", running=len(self._firings))
            _, late = await asyncio.wait(list(self._firings), timeout=self._drain_s)
            for task in late:
                task.cancel()  # each naks its work (another executor takes it now) and kills its worker
            if late:
                await asyncio.wait(late)
        if getattr(self, "tombstones", None) is not None:
            await self.tombstones.close()

    async def stop(self, timeout: float = 10.0) -> None:
        # Leave a little of the timeout to hand back late firings and close the workers.
        self._drain_s = max(0.0, timeout - min(2.0, timeout / 4))
        try:
            if self.reporter is not None:
                await self.reporter.stop()  # leaves the registry first: no scheduler counts on it now
            await super().stop(timeout)
        finally:
            try:
                if getattr(self, "runner", None) is not None:
                    await self.runner.aclose(min(2.0, timeout / 4))  # callbacks not yet delivered get a moment
            finally:
                if self.workers is not None:
                    await self.workers.close()


async def run(settings: Settings, apps: list[str], *, pool: str | None = None, pools: list[str] | None = None,
              labels: dict[str, str] | None = None, instance: str | None = None) -> None:
    await Executor(settings, apps, pool=pool, pools=pools, labels=labels, instance=instance).run()


def serve_pools(settings: Settings, asked: list[str] | None, devices: DeviceAllocator) -> list[str]:
    """The pools this executor serves: those asked for (``--pool``, or ``PETRIBUS_POOL``, comma-separated),
    else ``cpu``, and with GPUs also ``gpu`` and ``gpu-<type>`` for each type it has (so ``petribus
    serve`` on a GPU machine runs every transition; ``--pool gpu`` makes a GPU-only executor). Refuses a
    GPU pool it has no devices for, and a typed GPU pool whose type it does not have."""
    if not asked and "pool" in settings.model_fields_set:
        asked = [p for p in settings.pool.split(",") if p.strip()]
    if not asked:
        asked = ["cpu", "gpu", *sorted(f"gpu-{t.lower()}" for t in devices.types)] if devices.total else ["cpu"]
    pools = list(dict.fromkeys(check_pool_name(p.strip()) for p in asked))
    for pool in pools:
        if not is_gpu_pool(pool):
            continue
        if devices.total == 0:
            raise PetribusError(
                f"this executor cannot serve pool {pool!r}: it is a GPU pool and this machine has no GPUs "
                "(nvidia-smi lists none, or is not installed). Run it on a machine with GPUs, serve a CPU pool "
                "(--pool cpu), or simulate devices with --gpus N / PETRIBUS_GPUS=N (tests only: nothing "
                "real is there)", code="no_gpus")
        kind = pool.removeprefix("gpu-").upper() if pool != "gpu" else None
        if kind and devices.types and kind not in devices.types:
            raise PetribusError(
                f"this executor cannot serve pool {pool!r}: it has {sorted(devices.types)} GPUs, not {kind}. "
                f"Serve {['gpu', *sorted(f'gpu-{t.lower()}' for t in devices.types)]} here, or run the "
                f"{pool} executor on a machine with {kind} GPUs", code="wrong_gpus")
    return pools


def parse_labels(text: str | list[str] | None) -> dict[str, str]:
    """``key=value`` pairs, comma-separated in a string (``PETRIBUS_LABELS``) or one per item."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    labels: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PetribusError(f"label {item!r} is not key=value; fix --label or PETRIBUS_LABELS",
                                code="bad_label")
        labels[key.strip()] = value.strip()
    return labels
