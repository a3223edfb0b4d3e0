"""Secrets: named values a transition sees as environment variables, kept in a NATS KV bucket.

A transition names the secrets it needs (``@bot.transition(secrets=["API_TOKEN"])``); the executor
resolves them per firing into that worker's environment and nowhere else. The rule, in order:

1. the value in the ``PB_SECRETS`` bucket (``petribus secrets set API_TOKEN``) wins;
2. else the executor's environment variable ``PETRIBUS_SECRET_API_TOKEN`` (never the bare name, so the
   executor's own ``OPENAI_API_KEY`` or ``NATS_*`` cannot reach a transition by being named);
3. else the firing fails for good with :class:`MissingSecret`, naming every missing secret.

:class:`SecretStore` keeps a copy of the bucket in memory, brought up to date by a KV watch (pushed by
the server, no polling), so ``resolve`` is a dictionary lookup. A change made with ``petribus secrets
set`` reaches running executors as soon as the watch delivers it; a firing that started before keeps
the value it started with. Values never appear in a repr, a log line or an error: only names do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from petribus.errors import BusError, PetribusError
from petribus.outage import default_budget, on_reconnect, retry
from petribus.resources import SECRET_NAME_RE

SECRETS_BUCKET = "PB_SECRETS"
ENV_PREFIX = "PETRIBUS_SECRET_"
MAX_VALUE_BYTES = 64 * 1024

log = structlog.get_logger("petribus.secrets")


class MissingSecret(PetribusError, LookupError):
    """A transition needs secrets that are neither in the store nor in the executor's environment."""

    code = "missing_secret"
    retryable = False

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        listed = ", ".join(self.names)
        how = "; ".join(f"petribus secrets set {n}" for n in self.names)
        super().__init__(
            f"secret(s) not set: {listed}. Set each with `{how}` (the value is read from stdin), or give the "
            f"executor the environment variable {ENV_PREFIX}<NAME>")


class InvalidSecret(PetribusError, ValueError):
    """A secret's name or value cannot be stored."""

    code = "invalid_secret"


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown of a secret: its name and when it was last set. Never its value."""

    name: str
    updated: datetime | None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        raise InvalidSecret(f"{name!r} is not a secret name; a name is an environment variable name: letters, "
                            "digits and '_', not starting with a digit, at most 128 chars (e.g. API_TOKEN)")
    return name


async def bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The secrets bucket, made if it is not there yet (by whichever process comes first)."""
    try:
        return await js.key_value(SECRETS_BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=SECRETS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            max_value_size=MAX_VALUE_BYTES, description="petribus secrets: name -> value, set with the CLI",
        ))
    except Exception:  # another process made it first, with its own settings: use that one
        return await js.key_value(SECRETS_BUCKET)


async def put(js: JetStreamContext, name: str, value: str) -> None:
    """Store ``value`` under ``name``; running executors see it once their watch delivers it."""
    check_name(name)
    data = value.encode()
    if not data:
        raise InvalidSecret(f"the value for {name} is empty; to remove the secret, run `petribus secrets "
                            f"delete {name}`")
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidSecret(f"the value for {name} is {len(data)} bytes; a secret may hold {MAX_VALUE_BYTES}")
    kv = await bucket(js)
    await kv.put(name, data)


async def remove(js: JetStreamContext, name: str) -> bool:
    """Delete ``name``; False when it was not set. Its history goes too (purge), so no old value lingers."""
    check_name(name)
    kv = await bucket(js)
    if name not in {s.name for s in await listing(js)}:
        return False
    await kv.purge(name)
    return True


async def listing(js: JetStreamContext) -> list[SecretInfo]:
    """Every secret's name and last update, sorted by name. Reads headers only: values never travel."""
    kv = await bucket(js)
    watcher = await kv.watchall(meta_only=True)
    found: dict[str, SecretInfo] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=10.0)
            if entry is None:  # the end of what is stored now
                break
            if entry.operation in (KV_DEL, KV_PURGE):
                found.pop(entry.key, None)
            else:
                found[entry.key] = SecretInfo(entry.key, _when(entry.created))
    finally:
        await watcher.stop()
    return [found[k] for k in sorted(found)]


class SecretStore:
    """The secrets bucket, mirrored in memory by a watch, with the executor's environment as fallback.

    ``environ`` is read at each ``resolve`` (default ``os.environ``), only for ``PETRIBUS_SECRET_<NAME>``.
    After each reconnect to NATS the store starts a fresh watch and swaps in what it loads: a watch's
    consumer the server dropped while the connection was down (a restart, a fail-over, an outage longer
    than its inactivity threshold) would otherwise go quiet and leave old values in use.
    """

    def __init__(self, nc: NATS, *, environ: Mapping[str, str] | None = None, replicas: int = 1) -> None:
        self._nc = nc
        self._environ = os.environ if environ is None else environ
        self._replicas = replicas
        self._values: dict[str, str] = {}
        self._watch: tuple[KeyValue.KeyWatcher, asyncio.Task[None]] | None = None
        self._changed = asyncio.Condition()
        self._unhook: Callable[[], None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SecretStore(bucket={SECRETS_BUCKET!r}, stored={len(self._values)})"

    async def start(self) -> None:
        """Load what is stored and keep it up to date. Returns once the stored secrets are known."""
        await self._rewatch()
        self._unhook = on_reconnect(self._nc, self._renew)

    async def _renew(self) -> None:
        # Right after a reconnect the bucket's stream may still be electing a leader: wait for it, within
        # the bus's outage budget (then the hook's failure is logged and the old watch stays).
        await retry(self._nc, "renewing the secrets watch", lambda _: self._rewatch(), budget_s=default_budget())

    async def _rewatch(self) -> None:
        """A new watch from what is stored now; once it has loaded, it replaces the one before."""
        if self._closed:
            return
        kv = await bucket(self._nc.jetstream(), replicas=self._replicas)
        watcher = await kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._follow(watcher, loaded), name="secrets-watch")
        await asyncio.wait({loaded, task}, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():  # the watch ended before it loaded: say why
            error = None if task.cancelled() else task.exception()
            await _stop(watcher, task)
            raise error or BusError("the secrets watch ended before it had loaded the bucket")
        if self._closed:  # closed while this watch was loading
            await _stop(watcher, task)
            return
        old, self._watch = self._watch, (watcher, task)
        if old is not None:
            await _stop(*old)
            log.info("secrets watch renewed", stored=len(self._values))
            async with self._changed:
                self._changed.notify_all()

    async def _follow(self, watcher: KeyValue.KeyWatcher, loaded: asyncio.Future[None]) -> None:
        values: dict[str, str] = {}
        async for entry in watcher:
            if entry is None:  # the end of what was stored when the watch began: it is the truth now
                self._values = values
                loaded.set_result(None)
                continue
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            if deleted:
                values.pop(entry.key, None)
            else:
                values[entry.key] = (entry.value or b"").decode(errors="replace")
            if loaded.done():
                log.info("secret changed", secret=entry.key, deleted=deleted)
                async with self._changed:
                    self._changed.notify_all()

    async def changed(self) -> None:
        """Wait for the next change the watch delivers (for tests and tools; ``resolve`` never waits)."""
        async with self._changed:
            await self._changed.wait()

    def resolve(self, names: tuple[str, ...] | list[str]) -> dict[str, str]:
        """``{name: value}`` for each of ``names``; :class:`MissingSecret` listing every one not found."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            if name in self._values:
                found[name] = self._values[name]
            elif (env := self._environ.get(ENV_PREFIX + name)) is not None:
                found[name] = env
            else:
                missing.append(name)
        if missing:
            raise MissingSecret(missing)
        return found

    def names(self) -> list[str]:
        """The names stored in the bucket now (not those only in the environment)."""
        return sorted(self._values)

    async def close(self) -> None:
        self._closed = True
        if self._unhook is not None:
            self._unhook()
        if self._watch is not None:
            await _stop(*self._watch)
            self._watch = None
        self._values = {}


async def _stop(watcher: KeyValue.KeyWatcher, task: asyncio.Task[None]) -> None:
    with contextlib.suppress(Exception):  # the connection may be closing already
        await watcher.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _when(created: object) -> datetime | None:
    return created if isinstance(created, datetime) else None
