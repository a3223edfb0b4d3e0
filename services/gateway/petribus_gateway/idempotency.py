"""Idempotency keys: a client's retried add lands once, and the retry gets the first answer back.

A key (REST ``Idempotency-Key`` header, WebSocket ``request_id``) names one request within one
session. Two things are made from it:

- the appended event's ``Nats-Msg-Id``, ``client:<session>:<key>``: inside PB_EVENTS' duplicate
  window JetStream drops a retry and acks it with the original's sequence;
- the event's id (and an added marker's id), a uuid5 of bot, session and key: a retry is the same
  event, recognisable at any age, and the answer to a retry is read back from the log, so both
  answers agree (``replayed`` tells them apart). Past the duplicate window JetStream appends a late
  retry again, but the fold adds a marker id it has seen only once, so a keyed marker still counts
  once; a late user_message shows twice (finding it would mean reading the whole session per add).

Answers (accept, reject, confirm_response, file uploads) are already appended once per thing they
answer (``answer:<target>``); for them the key only makes the event id, so that a retry of an answer
that landed is recognised as that answer instead of being refused as "already answered".
"""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar

from petribus import subjects
from petribus.bus import EventLog
from petribus.events import Event, MarkerAdded, _Event, decode
from petribus_gateway.errors import IdempotencyKeyReused, InvalidIdempotencyKey, bus_failure

NAMESPACE = uuid.UUID("5b0c6c1e-7d0e-4c55-9a55-1d0c3f7a2b10")  # petribus client requests
KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
MAX_KEY = 128

E = TypeVar("E", bound=_Event)


def check_key(value: Any, what: str = "Idempotency-Key") -> str:
    """``value`` if it can name a request: 1-128 printable ASCII characters, no spaces."""
    if not isinstance(value, str) or not KEY_RE.match(value):
        shown = repr(value[:140]) if isinstance(value, str) else type(value).__name__
        raise InvalidIdempotencyKey(
            f"{what} {shown} is not valid: use 1-{MAX_KEY} printable ASCII characters without spaces, "
            "one per request (a uuid4 works), and the same one when you send that request again",
            code="invalid_idempotency_key" if what == "Idempotency-Key" else "invalid_request_id",
        )
    return value


def msg_id(session_id: str, key: str) -> str:
    return f"client:{session_id}:{key}"


def keyed(event: E, key: str) -> E:
    """``event`` with the id (and marker id) that ``key`` gives it in its session."""
    event_id = uuid.uuid5(NAMESPACE, f"{event.bot}:{event.session_id}:{key}").hex
    update: dict[str, Any] = {"id": event_id}
    if isinstance(event, MarkerAdded):
        marker_id = uuid.uuid5(NAMESPACE, f"{event_id}:marker").hex
        update["marker"] = event.marker.model_copy(update={"id": marker_id})
    return event.model_copy(update=update)


def _same_request(a: _Event, b: _Event) -> bool:
    # Who sent it is not part of the request: a retry may come from another address (only callers who may
    # use the session get here at all). Nor is the trace it was sent in: a retry is a new trace.
    return a.model_dump(exclude={"ts", "actor", "trace"}) == b.model_dump(exclude={"ts", "actor", "trace"})


async def append(events: EventLog, event: E, key: str) -> tuple[int, _Event, bool]:
    """Append ``keyed(event, key)`` once; (its sequence, the event as the log holds it, replayed).

    ``IdempotencyKeyReused`` when the key already named a different request of this session.
    """
    event = keyed(event, key)
    seq = await events.append(event, msg_id=msg_id(event.session_id, key))
    stored = await _at(events, event, seq)
    if stored is None or stored.ts == event.ts:
        return seq, event, False  # ours landed (or the read back failed: the append itself is done)
    if not _same_request(stored, event):
        raise IdempotencyKeyReused(
            f"key {key!r} already named a different request in this session (its event is at seq {seq}); "
            "use a new key for each new request", code="idempotency_key_reused")
    return seq, stored, True


async def _at(events: EventLog, event: _Event, seq: int) -> Event | None:
    """The event at ``seq`` if it is ``event``'s (same id); None when it cannot be read now."""
    try:
        # From the stream leader (not a direct get a lagging replica may answer): the append was just acked.
        msg = await events.js.get_msg(subjects.EVENTS_STREAM, seq)
        stored = decode(msg.data or b"")
    except Exception as exc:  # a failed read back must not undo an append that landed
        if bus_failure(exc) is None and not isinstance(exc, ValueError):
            raise
        return None
    return stored if stored.id == event.id and stored.session_id == event.session_id else None


async def find(events: EventLog, event: _Event) -> tuple[int, Event] | None:
    """The session's event with ``event``'s id, if one landed: a keyed answer sent before."""
    for seq, stored in await events.read(event.bot, event.session_id):
        if stored.id == event.id:
            return seq, stored
    return None
