"""A service's side of deployments (``--deployments``): load every deployed version, say which loaded.

``petribus deploy`` (``petribus.deploy``) stores versions and says which is active where; a service started
with ``--deployments`` runs them. :class:`Deployed` follows the deployments bucket: each version that is
or was active in some environment (``Catalog.wanted``) is fetched once into the service's cache folder and
handed to the service (``on_version``), which loads it under its internal bot name ``<name>--<version>``
(two versions of one bot run side by side; a session stays on the version whose name its subjects carry).
Nothing is restarted: a new version is picked up while the service runs.

Each service says how a version went in the ``PB_READY`` bucket, one key per version, role and instance
(:class:`Report`): loaded, or the error that kept it from loading. The gateway sends new sessions to a
version only once it is ready (:func:`readiness`): a scheduler and an LLM service loaded it without error,
and every pool it needs has a live executor that runs it (the registry's ``bots``). A version some
service failed to load is reported with that error and never gets traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from petribus import logs, subjects
from petribus.deploy import Catalog, DeployError, Version, fetch, split_internal
from petribus.errors import PetribusError
from petribus.kv_mirror import KvMirror
from petribus.registry import ExecutorInfo

READY_BUCKET = subjects.READY_BUCKET
ROLES_NEEDED = ("scheduler", "llm")  # besides an executor per pool
RETRY_S = 2.0  # a version whose fetch met an unavailable bus is tried again after this
UNLOADED_RETRY_S = 1.0  # an event of a version not loaded here yet comes back after this
FAILED_RETRY_S = 30.0  # ... and of a version that failed to load here
_KEY_UNSAFE = re.compile(r"[^-_=a-zA-Z0-9]")
log = logs.get("petribus.deployed")


class Report(BaseModel):
    """How one instance of a service did with one version."""

    version: str
    role: str
    instance: str
    ok: bool
    error: str = ""
    at: float = 0.0


def _passing(exc: BaseException) -> bool:
    """Whether loading a version failed for a reason of the moment (the bus unavailable, a timeout), not
    of the version (its archive, its code): only the latter is reported, and keeps it from traffic."""
    if isinstance(exc, DeployError):
        return False
    if isinstance(exc, PetribusError):
        return exc.retryable
    return isinstance(exc, (nats.errors.Error, TimeoutError, ConnectionError))


def report_key(version: str, role: str, instance: str) -> str:
    return f"{version}.{role}.{_KEY_UNSAFE.sub('_', instance)}"


async def ready_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(READY_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=READY_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            description="petribus: which services loaded which deployed version, or why not"))


def _parse_report(_: str, value: bytes) -> Report | None:
    try:
        return Report.model_validate_json(value)
    except ValidationError:
        return None


class Reports(KvMirror[Report]):
    """The ``PB_READY`` bucket in memory (the gateway's view of what loaded where)."""

    def __init__(self, nc: NATS, *, replicas: int = 1) -> None:
        super().__init__(nc, lambda: ready_bucket(nc.jetstream(), replicas=replicas), _parse_report,
                         what="readiness")

    def of(self, version: str) -> list[Report]:
        return [r for r in self.items.values() if r.version == version]


def readiness(version: Version, reports: Iterable[Report], executors: Iterable[ExecutorInfo]) -> tuple[bool, str]:
    """Whether ``version`` may get new sessions and, when not, why (``"failed: ..."`` when a service could
    not load it: it never will; else what it still waits for)."""
    reports = list(reports)
    failed = [r for r in reports if not r.ok]
    if failed:
        first = failed[0]
        return False, f"failed: the {first.role} ({first.instance}) could not load it: {first.error}"
    waiting = [f"a {role}" for role in ROLES_NEEDED if not any(r.role == role for r in reports)]
    executors = list(executors)
    for pool in version.pools:
        if not any(pool in e.pools and version.bot in e.bots for e in executors):
            waiting.append(f"an executor of pool {pool!r}")
    if waiting:
        return False, "waiting for " + ", ".join(waiting) + " to load it"
    return True, "ready"


class Deployed:
    """Follows the deployments and hands each wanted version to ``on_version(version, folder)`` once, in
    the order they were deployed; reports each outcome in ``PB_READY`` as ``role``/``instance``.

    ``start`` returns once every version wanted at that moment has been handled, so a service that starts
    serving after it serves them all. Later versions are handled as the watch sees them."""

    def __init__(self, nc: NATS, *, role: str, instance: str, cache_dir: Path,
                 on_version: Callable[[Version, Path], Awaitable[None]], replicas: int = 1) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.role = role
        self.instance = instance
        self.cache_dir = Path(cache_dir)
        self.on_version = on_version
        self.replicas = replicas
        self.catalog = Catalog(nc, replicas=replicas, on_change=lambda _: self._wake.set())
        self.handled: dict[str, str] = {}  # version -> "" when loaded, else its error
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        self._kv = await ready_bucket(self.js, replicas=self.replicas)
        await self.catalog.start()
        await self._sync()
        self._task = asyncio.create_task(self._follow(), name=f"{self.role}-deployments")

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except Exception as exc:  # the bus is away: the next change (or reconnect) tries again
                log.warning("deployments not synced", role=self.role, error=repr(exc))

    async def _sync(self) -> None:
        for version in self.catalog.wanted():
            if version.version in self.handled:
                continue
            try:
                folder = await fetch(self.js, version, self.cache_dir)
                await self.on_version(version, folder)
            except Exception as exc:
                if _passing(exc):  # the bus away a moment: not the version's fault; try it again soon
                    log.warning("version not loaded yet; trying again", role=self.role, version=version.version,
                                error=repr(exc), retry_in_s=RETRY_S)
                    asyncio.get_running_loop().call_later(RETRY_S, self._wake.set)
                    continue
                error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self.handled[version.version] = error
                log.error("version not loaded", role=self.role, version=version.version, bot=version.bot,
                          error=error)
                await self._report(version, error)
            else:
                self.handled[version.version] = ""
                log.info("version loaded", role=self.role, version=version.version, bot=version.bot)
                await self._report(version, "")

    def retry_after(self, bot: str) -> float:
        """How long an event of ``bot``, a deployed version this process does not run, waits before it comes
        back: a moment while the version may still load here; longer once it failed to (another process
        may run it, and this one must not spin on it)."""
        named = split_internal(bot)
        return FAILED_RETRY_S if named is not None and self.handled.get(named[1]) else UNLOADED_RETRY_S

    async def _report(self, version: Version, error: str) -> None:
        assert self._kv is not None
        report = Report(version=version.version, role=self.role, instance=self.instance, ok=not error,
                        error=error[:2000], at=time.time())
        await self._kv.put(report_key(version.version, self.role, self.instance), report.model_dump_json().encode())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.catalog.close()


async def follow(nc: NATS, *, role: str, instance: str, data_dir: Path, add_net: Callable[..., None],
                 replicas: int = 1) -> Deployed:
    """For the services that run every version in their own process (scheduler, LLM service, gateway):
    each wanted version is loaded with ``petribus.deploy.load`` (its modules private to it) and its net
    given to ``add_net``. Returns once the versions deployed now are loaded."""
    from petribus.deploy import load

    async def on_version(version: Version, folder: Path) -> None:
        net = await asyncio.to_thread(load, folder, version)
        add_net(net)

    deployed = Deployed(nc, role=role, instance=instance, cache_dir=apps_dir(data_dir), on_version=on_version,
                        replicas=replicas)
    await deployed.start()
    return deployed


def apps_dir(data_dir: Path) -> Path:
    """Where a service keeps the versions it fetched (each in a folder named by its version)."""
    return Path(data_dir) / "apps"


async def status(js: JetStreamContext, version: Version, *, heartbeat_s: float = 5.0) -> tuple[bool, str, list[Report]]:
    """Whether ``version`` is ready (as the gateway judges it), why not, and what each service said: for
    ``petribus deployments show``."""
    from petribus.kv_mirror import load_stored
    from petribus.registry import Registry

    kv = await ready_bucket(js)
    watcher = await kv.watch(f"{version.version}.>")
    reports: list[Report] = []

    def keep(entry: KeyValue.Entry) -> None:
        if entry.value and (report := _parse_report(entry.key, entry.value)) is not None:
            reports.append(report)

    try:
        await load_stored(kv, watcher, keep, timeout_s=10.0)
    finally:
        await watcher.stop()
    executors = await Registry(js, heartbeat_s=heartbeat_s).list()
    ok, why = readiness(version, reports, executors)
    return ok, why, sorted(reports, key=lambda r: (r.role, r.instance))
