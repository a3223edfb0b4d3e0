"""Which executors are alive, what pools they serve, and what they have free: a NATS KV bucket.

Every executor puts one entry (its ``ExecutorInfo``) in ``PB_EXECUTORS`` when it starts and again every
``PETRIBUS_REGISTRY_HEARTBEAT_S``; it deletes the entry when it stops cleanly. The bucket's TTL is a few
heartbeats, so the entry of an executor that died (kill -9, a lost machine) expires by itself; readers
also skip an entry older than that, so a server that keeps an expired entry a little longer misleads
nobody.

Readers: ``Registry.list()`` (one look: ``GET /pools``) and ``Registry.watch()`` (a live view kept up to
date by a KV watch: the scheduler asks it, at every dispatch, whether a pool has an executor).

The registry only informs. Work reaches executors through their pools' durable consumers whether or
not anyone reads this; a pool nobody serves keeps its work in PB_WORK until an executor joins.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, Field

from petribus import logs, subjects
from petribus.errors import PetribusError
from petribus.kv_mirror import load_stored

log = logs.get("petribus.registry")

TTL_HEARTBEATS = 3  # an entry outlives its executor's last report by this many heartbeats
POOL_NAME = re.compile(r"[A-Za-z0-9_-]+")


def is_gpu_pool(pool: str) -> bool:
    """``gpu`` and ``gpu-<type>`` (what ``petribus.resources.pool_for`` makes of ``gpu=``) need GPUs."""
    return pool == "gpu" or pool.startswith("gpu-")


def check_pool_name(pool: str) -> str:
    """A pool name is one token of a NATS subject: letters, digits, ``_`` and ``-``."""
    if not POOL_NAME.fullmatch(pool):
        raise PetribusError(f"pool name {pool!r} is not allowed; use letters, digits, '_' and '-' only "
                            "(e.g. cpu, gpu, gpu-a10g, big-memory)", code="bad_pool")
    return pool


def start_hint(pool: str, app: str = "APP") -> str:
    """The command that starts an executor for ``pool``."""
    if pool == "gpu":
        return f"petribus executor {app} --pool gpu  (on a machine with GPUs; --gpus N only simulates them)"
    if pool.startswith("gpu-"):
        kind = pool.removeprefix("gpu-").upper()
        return f"petribus executor {app} --pool {pool}  (on a machine with {kind} GPUs)"
    return f"petribus executor {app} --pool {pool}"


class DeviceInfo(BaseModel):
    id: str = Field(description="The device's index: what CUDA_VISIBLE_DEVICES takes.")
    type: str | None = Field(default=None, description="GPU type (A10G, H100, ...); None when unknown.")
    name: str | None = Field(default=None, description="The driver's name for it.")
    uuid: str | None = None
    memory_mib: int | None = None
    busy: bool = Field(default=False, description="Held by a running firing.")


class PoolLoad(BaseModel):
    capacity: int = Field(description="Work items of this pool the executor takes at once.")
    running: int = Field(description="Work items of this pool it holds now (running, or waiting for a "
                         "worker or a device).")

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.running)


class ExecutorInfo(BaseModel):
    """What an executor says about itself in the registry."""

    instance: str = Field(description="The executor's id, as in transition_started.executor.")
    pools: list[str] = Field(description="The pools whose work it takes.")
    labels: dict[str, str] = Field(default_factory=dict)
    devices: list[DeviceInfo] = Field(default_factory=list)
    workers: int = Field(description="Worker processes at most (sync firings at once).")
    load: dict[str, PoolLoad] = Field(default_factory=dict, description="Per pool: capacity and what it holds.")
    running: int = Field(default=0, description="Firings it holds now, every pool together.")
    version: str = ""
    bots: list[str] = Field(default_factory=list, description="The bots whose work it runs (their nets loaded).")
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    at: float = Field(default=0.0, description="When it last reported (Unix time).")
    heartbeat_s: float = 5.0

    @property
    def free_devices(self) -> int:
        return sum(not d.busy for d in self.devices)

    def key(self) -> str:
        return entry_key(self.instance)


def entry_key(instance: str) -> str:
    return re.sub(r"[^A-Za-z0-9_=-]", "_", instance)


def ttl_for(heartbeat_s: float) -> float:
    return max(1.0, TTL_HEARTBEATS * heartbeat_s)


async def bucket(js: JetStreamContext, heartbeat_s: float, *, replicas: int = 1) -> KeyValue:
    """The registry bucket, created with a TTL of a few heartbeats if it does not exist yet (whoever
    creates it first decides the TTL)."""
    try:
        return await js.key_value(subjects.EXECUTORS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    ttl = ttl_for(heartbeat_s)
    config = KeyValueConfig(bucket=subjects.EXECUTORS_BUCKET, history=1, ttl=ttl, replicas=replicas,
                            storage=StorageType.FILE, description="petribus executors: pools, devices, load",
                            limit_marker_ttl=ttl)
    try:
        return await js.create_key_value(config)
    except nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError:
        # An older server: no expiry markers; watchers age entries out themselves.
        return await js.create_key_value(config.evolve(limit_marker_ttl=None))
    except nats.js.errors.BadRequestError:
        return await js.key_value(subjects.EXECUTORS_BUCKET)  # another process created it meanwhile


class Reporter:
    """An executor's entry: put at start and every heartbeat, deleted at a clean stop."""

    def __init__(self, js: JetStreamContext, describe: Callable[[], ExecutorInfo], *, heartbeat_s: float,
                 replicas: int = 1) -> None:
        self.js = js
        self.describe = describe
        self.heartbeat_s = heartbeat_s
        self.replicas = replicas
        self.kv: KeyValue | None = None
        self._left = False
        self._lock = asyncio.Lock()  # a report in flight lands before the goodbye, never after it

    async def start(self) -> None:
        self.kv = await bucket(self.js, self.heartbeat_s, replicas=self.replicas)
        await self.report()

    async def report(self) -> None:
        assert self.kv is not None
        async with self._lock:
            if self._left:
                return  # a beat after the goodbye would bring the entry back until its TTL
            info = self.describe()
            info.at = time.time()
            info.heartbeat_s = self.heartbeat_s
            await self.kv.put(info.key(), info.model_dump_json().encode())

    async def run(self) -> None:
        """Report every heartbeat; a failed report is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.report()
            except Exception as exc:  # the bus is away: the entry may expire, and comes back with it
                log.warning("registry report failed", error=repr(exc))

    async def stop(self) -> None:
        self._left = True
        if self.kv is None:
            return
        try:
            async with self._lock:
                await self.kv.delete(self.describe().key())
        except Exception as exc:  # stopping anyway: the entry expires by itself
            log.warning("could not remove this executor from the registry", error=repr(exc))


def _decode(raw: bytes | None) -> ExecutorInfo | None:
    if not raw:
        return None
    try:
        return ExecutorInfo.model_validate(json.loads(raw))
    except ValueError:
        return None  # another version's entry, or garbage: not an executor we can describe


def _alive(info: ExecutorInfo, now: float) -> bool:
    return now - info.at <= ttl_for(info.heartbeat_s)


class Registry:
    """Reads the registry."""

    def __init__(self, js: JetStreamContext, *, heartbeat_s: float = 5.0, replicas: int = 1) -> None:
        self.js = js
        self.heartbeat_s = heartbeat_s
        self.replicas = replicas

    async def list(self) -> list[ExecutorInfo]:
        """The executors alive now, by instance."""
        kv = await bucket(self.js, self.heartbeat_s, replicas=self.replicas)
        watcher = await kv.watchall()
        found: dict[str, ExecutorInfo] = {}

        def apply(entry: KeyValue.Entry) -> None:
            if entry.operation in (KV_DEL, KV_PURGE):
                found.pop(entry.key, None)
            elif (info := _decode(entry.value)) is not None:
                found[entry.key] = info

        try:
            await load_stored(kv, watcher, apply, timeout_s=30.0)
        finally:
            await watcher.stop()
        now = time.time()
        return sorted((i for i in found.values() if _alive(i, now)), key=lambda i: i.instance)

    async def watch(self, on_change: Callable[[ExecutorInfo | None, str], None] | None = None) -> RegistryView:
        """A live view, complete when this returns. ``on_change(info, key)`` runs for every update
        (``info`` None: the executor left)."""
        view = RegistryView(await bucket(self.js, self.heartbeat_s, replicas=self.replicas), on_change)
        await view.start()
        return view


class RegistryView:
    """The registry as a KV watch keeps it: ``executors()`` and ``serves()`` answer without I/O."""

    def __init__(self, kv: KeyValue, on_change: Callable[[ExecutorInfo | None, str], None] | None) -> None:
        self.kv = kv
        self.on_change = on_change
        self._seen: dict[str, tuple[ExecutorInfo, float]] = {}  # key -> (info, when it arrived here)
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def start(self) -> None:
        self._watcher = await self.kv.watchall()
        await load_stored(self.kv, self._watcher, self._apply, timeout_s=30.0)
        self._task = asyncio.create_task(self._follow(), name="registry-watch")

    async def _follow(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        info = None if entry.operation in (KV_DEL, KV_PURGE) else _decode(entry.value)
        if info is None:
            self._seen.pop(entry.key, None)
        else:
            self._seen[entry.key] = (info, time.monotonic())
        if self.on_change is not None:
            try:
                self.on_change(info, entry.key)
            except Exception as exc:  # a reader's bug must not stop the view
                log.error("registry on_change failed", error=repr(exc), exc_info=exc)

    def executors(self) -> list[ExecutorInfo]:
        """Those whose last report arrived here within the TTL."""
        now = time.monotonic()
        return [info for info, at in self._seen.values() if now - at <= ttl_for(info.heartbeat_s)]

    def serves(self, pool: str) -> bool:
        return any(pool in info.pools for info in self.executors())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:  # the connection may be closed already
                pass
