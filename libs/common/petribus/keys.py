"""API keys: who may call the gateway, as which owner, on which bots (docs/security.md).

A token is ``pb_<key id>_<secret>``: the key id (16 hex digits) names the key in the log, in
``petribus keys list`` and in events' ``actor``; the secret (32 random bytes, url-safe base64) is shown
once, when the key is made, and never stored. The ``PB_KEYS`` bucket holds, under the key id, a
:class:`KeyRecord`: the SHA-256 of the secret, the owner, the admin flag, the bots the key may use
(none listed: every bot), when it was made and whether it was revoked. A secret of 256 random bits needs
no salt or slow hash: nobody can guess one from its digest. Checking compares digests in constant time.

A revoked key stays in the bucket (revoked, with its time) so that the key ids in old events still say
whose they were; it never authenticates again.

:class:`KeyStore` keeps the bucket in memory through a KV watch (pushed by the server, no polling), so
checking a token is a dictionary look-up and a revoke takes effect as soon as the watch delivers it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from petribus.errors import PetribusError
from petribus.kv_mirror import KvMirror, load_stored

KEYS_BUCKET = "PB_KEYS"
PREFIX = "pb"
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
BOT_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
SECRET_BYTES = 32  # 256 bits

log = structlog.get_logger("petribus.keys")


class InvalidKey(PetribusError, ValueError):
    """An owner, bot or key id that cannot be stored or named."""

    code = "invalid_key"


class KeyRecord(BaseModel):
    """What the bucket holds for one key: never the token or its secret, only the secret's digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    owner: str
    admin: bool = False
    bots: list[str] = Field(default_factory=list, description="Bots the key may use; empty: every bot.")
    secret_sha256: str = Field(description="Hex SHA-256 of the token's secret part.")
    created: float = Field(default_factory=time.time)
    revoked: float | None = Field(default=None, description="When it was revoked (Unix time); None: live.")


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    owner: str
    key_id: str
    admin: bool
    bots: tuple[str, ...]

    def may_use(self, bot: str) -> bool:
        return not self.bots or bot in self.bots


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        raise InvalidKey(f"owner {owner!r} is not a valid name: use 1-128 letters, digits, '_', '.', '@' or '-', "
                         "starting with a letter or digit (e.g. alice or team-billing)")
    return owner


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        raise InvalidKey(f"{key_id!r} is not a key id; a key id is 16 hex digits, as `petribus keys list` shows")
    return key_id


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(owner: str, *, admin: bool = False, bots: list[str] | tuple[str, ...] = ()) -> tuple[str, KeyRecord]:
    """A fresh token and the record to store for it. The token exists only in the return value."""
    check_owner(owner)
    for bot in bots:
        if not BOT_RE.match(bot):
            raise InvalidKey(f"{bot!r} is not a bot name (letters, digits, '_' and '-')")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = KeyRecord(key_id=key_id, owner=owner, admin=admin, bots=sorted(set(bots)), secret_sha256=digest(secret))
    return f"{PREFIX}_{key_id}_{secret}", record


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    prefix, sep, rest = token.partition("_")
    key_id, sep2, secret = rest.partition("_")
    if prefix != PREFIX or not sep or not sep2 or not KEY_ID_RE.match(key_id) or not secret:
        return None
    return key_id, secret


def verify(records: dict[str, KeyRecord], token: str) -> Principal | None:
    """The principal ``token`` speaks for among ``records``; None for a malformed, unknown or revoked one."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    key_id, secret = parsed
    record = records.get(key_id)
    if record is None:
        return None
    if not hmac.compare_digest(record.secret_sha256, digest(secret)) or record.revoked is not None:
        return None
    return Principal(owner=record.owner, key_id=record.key_id, admin=record.admin, bots=tuple(record.bots))


# ---------------------------------------------------------------- the bucket


async def bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The keys bucket, made if it is not there yet (by whichever process comes first)."""
    try:
        return await js.key_value(KEYS_BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=KEYS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            description="petribus API keys: key id -> owner, flags and the digest of its secret",
        ))
    except Exception:  # another process made it first, with its own settings: use that one
        return await js.key_value(KEYS_BUCKET)


async def create(js: JetStreamContext, owner: str, *, admin: bool = False, bots: list[str] | tuple[str, ...] = (),
                 replicas: int = 1) -> tuple[str, KeyRecord]:
    """Make and store a key; the token is returned once and kept nowhere."""
    token, record = new_key(owner, admin=admin, bots=bots)
    kv = await bucket(js, replicas=replicas)
    await kv.create(record.key_id, record.model_dump_json().encode())
    return token, record


async def listing(js: JetStreamContext) -> list[KeyRecord]:
    """Every key (revoked ones too), oldest first."""
    kv = await bucket(js)
    watcher = await kv.watchall()
    found: dict[str, KeyRecord] = {}
    try:
        await load_stored(kv, watcher, lambda entry: _apply(found, entry), timeout_s=10.0)
    finally:
        await watcher.stop()
    return sorted(found.values(), key=lambda r: (r.created, r.key_id))


async def revoke(js: JetStreamContext, key_id: str) -> KeyRecord | None:
    """Mark a key revoked (it stays listed, for the audit trail); None when there is no such key."""
    check_key_id(key_id)
    kv = await bucket(js)
    try:
        entry = await kv.get(key_id)
    except KeyNotFoundError:
        return None
    record = KeyRecord.model_validate_json(entry.value or b"")
    if record.revoked is None:
        record = record.model_copy(update={"revoked": time.time()})
        await kv.update(key_id, record.model_dump_json().encode(), last=entry.revision)
    return record


def _parse_record(key_id: str, value: bytes) -> KeyRecord | None:
    try:
        return KeyRecord.model_validate_json(value)
    except ValidationError:
        log.error("ignoring an unreadable key record", key_id=key_id)  # never authenticates
        return None


def _apply(found: dict[str, KeyRecord], entry: KeyValue.Entry) -> None:
    record = None if entry.operation in (KV_DEL, KV_PURGE) else _parse_record(entry.key, entry.value or b"")
    if record is None:
        found.pop(entry.key, None)
    else:
        found[entry.key] = record


class KeyStore(KvMirror[KeyRecord]):
    """The keys bucket mirrored in memory by a watch (``KvMirror``); ``authenticate`` is a look-up, never a
    request. A watch renewed after a reconnect makes a revoke done while the connection was down count."""

    def __init__(self, nc: NATS, *, replicas: int = 1) -> None:
        super().__init__(nc, lambda: bucket(nc.jetstream(), replicas=replicas), _parse_record, what="keys")

    def __repr__(self) -> str:
        return f"KeyStore(bucket={KEYS_BUCKET!r}, keys={len(self.items)})"

    def authenticate(self, token: str) -> Principal | None:
        return verify(self.items, token)

    def is_live(self, key_id: str) -> bool:
        record = self.items.get(key_id)
        return record is not None and record.revoked is None

    def any_live(self) -> bool:
        """Whether any key may still authenticate: then an authorized bot needs one."""
        return any(r.revoked is None for r in self.items.values())
