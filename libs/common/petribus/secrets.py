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

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from petribus.errors import PetribusError
from petribus.kv_mirror import KvMirror, load_stored
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

    def apply(entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            found.pop(entry.key, None)
        else:
            found[entry.key] = SecretInfo(entry.key, _when(entry.created))

    try:
        await load_stored(kv, watcher, apply, timeout_s=10.0)
    finally:
        await watcher.stop()
    return [found[k] for k in sorted(found)]


class SecretStore(KvMirror[str]):
    """The secrets bucket, mirrored in memory by a watch, with the executor's environment as fallback.

    ``environ`` is read at each ``resolve`` (default ``os.environ``), only for ``PETRIBUS_SECRET_<NAME>``.
    After each reconnect to NATS the store starts a fresh watch and swaps in what it loads: a watch's
    consumer the server dropped while the connection was down (a restart, a fail-over, an outage longer
    than its inactivity threshold) would otherwise go quiet and leave old values in use.
    """

    def __init__(self, nc: NATS, *, environ: Mapping[str, str] | None = None, replicas: int = 1) -> None:
        super().__init__(nc, lambda: bucket(nc.jetstream(), replicas=replicas),
                         lambda _, value: value.decode(errors="replace"), what="secrets")
        self._environ = os.environ if environ is None else environ

    def __repr__(self) -> str:
        return f"SecretStore(bucket={SECRETS_BUCKET!r}, stored={len(self.items)})"

    def resolve(self, names: tuple[str, ...] | list[str]) -> dict[str, str]:
        """``{name: value}`` for each of ``names``; :class:`MissingSecret` listing every one not found."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            if name in self.items:
                found[name] = self.items[name]
            elif (env := self._environ.get(ENV_PREFIX + name)) is not None:
                found[name] = env
            else:
                missing.append(name)
        if missing:
            raise MissingSecret(missing)
        return found

    def names(self) -> list[str]:
        """The names stored in the bucket now (not those only in the environment)."""
        return sorted(self.items)


def _when(created: object) -> datetime | None:
    return created if isinstance(created, datetime) else None
