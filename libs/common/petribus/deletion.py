"""Deleting a session so that it stays deleted (docs/limits.md).

A session is its subject in PB_EVENTS: purging the subject deletes it. But a firing still running, an LLM
reply being written or a timer due may append to the subject after the purge, and the session would be
back, with no ``session_created`` and no owner. So deletion is three steps, in this order:

1. a **tombstone** for the session in the KV bucket ``PB_DELETED`` (kept ``PETRIBUS_DELETED_TTL_S``);
2. its files, its work items in PB_WORK and its timers are removed;
3. its subject is purged.

Every process that appends for a session on its own (the executor) holds the bucket in memory through a
KV watch (:class:`Tombstones`: pushed by the server, no polling) and refuses to append for a deleted
session (:class:`GuardedEventLog` raises :class:`SessionDeleted`); the executor acks such a firing's work
as cancelled. An append that still slips in (it was sent before the watch delivered the tombstone) is
delivered to the scheduler like any event; the scheduler acks it and purges the subject again
(:func:`purge_again`), so a deleted session never stays visible for longer than that round trip.

Nothing here imports a service: the gateway's ``DELETE``, the scheduler's expiry and the executor all use it.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from petribus import logs, subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.errors import PetribusError
from petribus.events import _Event
from petribus.files import FileStore
from petribus.kv_mirror import KvMirror

log = logs.get("petribus.deletion")


class SessionDeleted(PetribusError, LookupError):
    """The session was deleted (DELETE, or it expired): nothing more is appended for it."""

    code = "session_deleted"


async def bucket(js: JetStreamContext) -> KeyValue:
    """The ``PB_DELETED`` bucket (``bus.ensure_streams`` creates it)."""
    return await js.key_value(subjects.DELETED_BUCKET)


async def delete_session(events: EventLog, files: FileStore, bot: str, session_id: str, *,
                         reason: str = "deleted") -> None:
    """Tombstone, then remove the session's files, work items and timers, then purge its log. Idempotent:
    a retry after a failure half way does the rest."""
    js = events.js
    record = json.dumps({"at": time.time(), "reason": reason}).encode()
    await (await bucket(js)).put(subjects.tombstone(bot, session_id), record)
    for key in fold(await events.read(bot, session_id)).files:
        await files.delete(bot, session_id, key)
    for stream, subject in ((subjects.WORK_STREAM, subjects.session_work(bot, session_id)),
                            (subjects.TIMERS_STREAM, subjects.lease(bot, session_id)),
                            (subjects.IDLE_STREAM, subjects.idle_check(bot, session_id))):
        await js.purge_stream(stream, subject=subject)
    await events.delete(bot, session_id)
    log.info("session deleted", bot=bot, session_id=session_id, reason=reason)


async def purge_again(events: EventLog, bot: str, session_id: str) -> bool:
    """Purge a deleted session's subject once more if something was appended after its deletion (events
    delivered before the purge are gone already); whether there was."""
    if not await events.count(bot, session_id):
        return False
    await events.delete(bot, session_id)
    log.warning("a deleted session was appended to; purged again", bot=bot, session_id=session_id)
    return True


async def is_deleted(js: JetStreamContext, bot: str, session_id: str) -> bool:
    """Ask the bucket (one request): for a process that keeps no :class:`Tombstones`."""
    try:
        entry = await (await bucket(js)).get(subjects.tombstone(bot, session_id))
    except NotFoundError:  # KeyNotFoundError, and a deleted key
        return False
    return entry.operation not in (KV_DEL, KV_PURGE)


class Tombstones(KvMirror[bool]):
    """The deleted sessions, mirrored in memory by a KV watch (``KvMirror``): ``deleted()`` is a look-up.

    A tombstone that expires (``PETRIBUS_DELETED_TTL_S``) is forgotten here only at the next reload
    (after a reconnect): keeping it longer refuses nothing a live session needs.
    """

    def __init__(self, nc: NATS) -> None:
        super().__init__(nc, lambda: bucket(nc.jetstream()), lambda _, __: True, what="deleted-sessions")

    def deleted(self, bot: str, session_id: str) -> bool:
        return subjects.tombstone(bot, session_id) in self.items

    async def wait_deleted(self, bot: str, session_id: str, timeout: float) -> bool:
        """Whether the session is (or becomes, within ``timeout``) known as deleted here."""
        async def known() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.deleted(bot, session_id))

        try:
            await asyncio.wait_for(known(), timeout)
        except TimeoutError:
            return False
        return True


class GuardedEventLog(EventLog):
    """An ``EventLog`` that refuses to append for a session ``tombstones`` knows as deleted
    (:class:`SessionDeleted`): what a process that appends on a session's behalf uses."""

    def __init__(self, nc: NATS, js: JetStreamContext | None = None, *, tombstones: Tombstones,
                 outage_s: float | None = None) -> None:
        super().__init__(nc, js, outage_s=outage_s)
        self.tombstones = tombstones

    def check(self, event: _Event) -> None:
        if self.tombstones.deleted(event.bot, event.session_id):
            raise SessionDeleted(f"session {event.session_id!r} of bot {event.bot!r} was deleted; "
                                 f"its {event.type} is not appended")  # type: ignore[attr-defined]

    async def append(self, event: _Event, **options) -> int:  # type: ignore[no-untyped-def, override]
        self.check(event)
        return await super().append(event, **options)

    async def append_once(self, event: _Event, **options):  # type: ignore[no-untyped-def, override]
        self.check(event)
        return await super().append_once(event, **options)

    async def append_batch(self, events: list[_Event], **options) -> list[int]:  # type: ignore[no-untyped-def, override]
        for event in events[:1]:  # one session per batch
            self.check(event)
        return await super().append_batch(events, **options)

    async def append_soon(self, event: _Event, **options):  # type: ignore[no-untyped-def, override]
        self.check(event)
        return await super().append_soon(event, **options)

    async def send(self, event: _Event, **options) -> None:  # type: ignore[no-untyped-def, override]
        self.check(event)
        await super().send(event, **options)

    async def append_many(self, events, **options) -> list[int]:  # type: ignore[no-untyped-def, override]
        listed = list(events)
        for event in listed:
            self.check(event)
        return await super().append_many(listed, **options)


