"""Expiry: a session with no event for ``PETRIBUS_SESSION_TTL_S`` gets ``session_expired`` and is deleted.

Each session has a durable :class:`IdleCheck` timer on PB_IDLE (``timers.py``), armed by the first
scheduler process that folds the session (Msg-Id ``idle:<bot>:<session>:<last seq>``, so processes
arming at once land one). When it is due, whichever scheduler is alive looks at the session's last event
(one request to the stream leader, which gives its time):

- none: the session is gone already (deleted); the timer is done;
- newer than the TTL: the session is alive; a timer keyed by that last event is armed, due one TTL after
  it, and this one is done (timers armed by several processes converge on one key);
- older: ``session_expired`` (``idle_s``) is appended right after that last event (at the expected
  sequence: an event that lands meanwhile wins, and the check runs again), then the session is deleted
  like ``DELETE`` (``petribus.deletion``: tombstone, files, work, timers, log).

Nothing polls: the wait is JetStream's (a nak with the time left), and survives any restart. Bound: a
session is deleted at most one TTL plus the timers consumer's ack wait after its last event, while a
scheduler runs. When expiry first runs on a bus (its durable consumer does not exist yet), every session
already in the log is given a check due one TTL later; a session created while expiry was turned off
again afterwards has none until its next event.
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from petribus import deletion, subjects
from petribus.bus import EventLog, WrongLastSequence
from petribus.events import SessionExpired, decode
from petribus.files import FileStore
from petribus_scheduler.timers import DurableTimers, Timer


class IdleCheck(Timer):
    """Due one TTL after the session's event ``seq``: expire the session if nothing came after it."""

    seq: int

    def msg_id(self) -> str:
        return f"idle:{self.bot}:{self.session_id}:{self.seq}"

    def subject(self) -> str:
        return subjects.idle_check(self.bot, self.session_id)


class IdleChecks(DurableTimers[IdleCheck]):
    model = IdleCheck
    durable = subjects.SCHEDULER_IDLE_DURABLE
    filter_subject = subjects.idle_checks()
    stream = subjects.IDLE_STREAM  # not PB_TIMERS: one per session, for as long as the session lives

    def __init__(self, nc: NATS, events: EventLog, files: FileStore, log: Any, *, ttl_s: float,
                 ack_wait_s: float, retry_s: float = 1.0, retry_max_s: float = 60.0) -> None:
        super().__init__(nc, log, ack_wait_s=ack_wait_s, retry_s=retry_s, retry_max_s=retry_max_s)
        self.events = events
        self.files = files
        self.ttl_s = ttl_s
        self.expired = 0  # sessions this process expired (for the tests)

    async def start(self) -> None:
        try:
            await self.js.consumer_info(self.stream, self.durable)
            first = False
        except NotFoundError:
            first = True  # no scheduler ran expiry on this bus yet: the sessions already there have no timer
        await super().start()
        if first:
            await self._arm_existing()

    async def _arm_existing(self) -> None:
        """Arm an idle check, due one TTL from now, for every session in the log (once per bus: when expiry is
        first turned on). Schedulers starting together arm each session once (same Msg-Id)."""
        info = await self.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.all_events())
        due = time.time() + self.ttl_s
        sessions = {subjects.parse_events(s) for s in (info.state.subjects or {})}  # a subject per kind
        sent = [await self.arm(IdleCheck(bot=bot, session_id=sid, seq=0, due=due)) for bot, sid in sorted(sessions)]
        for ack in sent:
            await ack
        if sent:
            self.log.info("expiry turned on: existing sessions given an idle check", sessions=len(sent))

    async def watch(self, bot: str, session_id: str, seq: int) -> None:
        """Arm the session's idle check, keyed by its last folded event ``seq`` (due one TTL from now)."""
        await (await self.arm(IdleCheck(bot=bot, session_id=session_id, seq=seq, due=time.time() + self.ttl_s)))

    async def fire(self, timer: IdleCheck) -> float | None:
        subject = subjects.events(timer.bot, timer.session_id)
        try:
            last = await self.js.get_last_msg(subjects.EVENTS_STREAM, subject)
        except NotFoundError:
            return None  # deleted already
        assert last.seq is not None and last.time is not None
        now = time.time()
        idle = now - last.time.timestamp()
        if b'"session_expired"' in (last.data or b"") and decode(last.data or b"").type == "session_expired":
            # Expired already (by another check, or by one that died before the deletion): finish it.
            await deletion.delete_session(self.events, self.files, timer.bot, timer.session_id, reason="expired")
            return None
        if idle < self.ttl_s:
            await (await self.arm(IdleCheck(bot=timer.bot, session_id=timer.session_id, seq=last.seq,
                                            due=last.time.timestamp() + self.ttl_s)))
            return None
        expired = SessionExpired(bot=timer.bot, session_id=timer.session_id, idle_s=round(idle, 3))
        try:
            landed = await self.events.append_once(expired, expected_last_seq=last.seq,
                                                   msg_id=f"expired:{timer.bot}:{timer.session_id}")
        except WrongLastSequence:
            return now  # an event landed meanwhile (perhaps another check's session_expired): look again
        await deletion.delete_session(self.events, self.files, timer.bot, timer.session_id, reason="expired")
        if landed is not None:
            self.expired += 1
            self.log.info("session expired", bot=timer.bot, session_id=timer.session_id, idle_s=round(idle, 1))
        return None
