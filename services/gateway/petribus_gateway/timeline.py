"""A session's past, fast: its log's bytes and snapshots of its fold kept in memory, so that the state
at any sequence and any page of its history cost a short fold from the nearest snapshot, never a fold
from zero and never a read of the log.

The first question about a session reads its log once (batch by batch) and keeps each event's bytes
as stored (and, once a body asks for it, its client form as JSON), folding them as they come and
keeping a copy of the state every ``every`` events (1,000, or more for a long session so that it keeps
at most ``SNAPSHOTS`` copies). Later questions decode and fold
only the stored events between the nearest snapshot and the sequence asked for (at most ``every``),
after reading what was appended since the last question. Bytes, unlike decoded events, cost the
garbage collector nothing: it never walks them.

Memory: a copy of a state holds sets that grow with the log (every marker and firing ever seen, to
ignore duplicates); a session's weight is about ``ENTRY_BYTES`` per entry of those sets in its
snapshots plus its stored bytes. Sessions least recently asked about are dropped while the cache
weighs more than ``BUDGET_BYTES`` in all or holds more than ``SESSIONS`` sessions; the one being asked
about is always kept. A deleted session is forgotten when its log is found empty.

The log is the only truth: a snapshot is the fold of a prefix of it, and a prefix never changes.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from pydantic_core import to_json

from petribus.bus import EventLog
from petribus.core import SessionState, apply
from petribus.events import Event, Marker, decode, to_client

SNAPSHOTS = 32
MIN_EVERY = 1_000
SESSIONS = 16
BUDGET_BYTES = 256 * 1024 * 1024
ENTRY_BYTES = 60  # a set entry in a snapshot: its slot and its share of the table
EVENT_BYTES = 40  # per stored event besides its payload: the bytes object's header and list slots
OPTIONAL_METADATA = ("actor", "parent")  # what the WebSocket's shape leaves out when there is none

Key = tuple[str, str]


@dataclass(frozen=True)
class Step:
    """One event of a session and the change it made to the marking."""

    seq: int
    event: Event
    added: list[Marker]
    consumed: list[Marker]


@dataclass
class _Session:
    head: SessionState  # folded up to the newest event read
    seqs: list[int] = field(default_factory=list)  # every event's sequence, ascending
    payloads: list[bytes] = field(default_factory=list)  # and its bytes as stored
    shown: list[bytes | None] = field(default_factory=list)  # and as clients see it, once asked for (JSON)
    stored: int = 0  # bytes in payloads and shown
    snapshots: list[SessionState] = field(default_factory=list)  # ascending last_seq; the first is empty
    since: int = 0  # events folded into head since the newest snapshot
    every: int = MIN_EVERY
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def keep(self) -> None:
        self.snapshots.append(self.head.copy())
        self.since = 0

    @property
    def weight(self) -> int:
        entries = sum(_entries(s) for s in self.snapshots) + _entries(self.head)
        return entries * ENTRY_BYTES + self.stored + len(self.payloads) * EVENT_BYTES

    def nearest(self, seq: int) -> SessionState:
        """The newest snapshot folded up to ``seq`` or before it."""
        i = bisect.bisect_right([s.last_seq for s in self.snapshots], seq) - 1
        return self.snapshots[max(i, 0)]

    def stored_after(self, state: SessionState, until: int) -> range:
        """Indices into ``payloads`` of the events after ``state`` (a snapshot: it folded the first
        ``state.events`` of them) up to sequence ``until``."""
        return range(state.events, bisect.bisect_right(self.seqs, until))


class Timeline:
    def __init__(self, events: EventLog, *, sessions: int = SESSIONS, budget: int = BUDGET_BYTES) -> None:
        self.events = events
        self.sessions = sessions
        self.budget = budget
        self._cache: OrderedDict[Key, _Session] = OrderedDict()

    async def state_at(self, bot: str, session_id: str, at: int | None = None) -> SessionState:
        """The session's state after its events up to ``at`` (None: all of them), as a state of the
        caller's own. Its ``last_seq`` is 0 when the session has no events up to ``at``."""
        session = await self._session(bot, session_id, until=at)
        if at is None or at >= session.head.last_seq:
            return session.head.copy()
        state = session.nearest(at).copy()
        for i in session.stored_after(state, at):
            apply(state, session.seqs[i], decode(session.payloads[i]))
        return state

    async def history(self, bot: str, session_id: str, *, after: int, limit: int) -> tuple[list[Step], int]:
        """Up to ``limit`` steps after ``after``, each with the markers it added to and took from the
        marking; and the session's last sequence."""
        session = await self._session(bot, session_id)
        state = session.nearest(after).copy()
        journal: list[tuple[str, Marker]] = []
        state.journal = journal
        steps: list[Step] = []
        for i in session.stored_after(state, session.head.last_seq):
            seq, event = session.seqs[i], decode(session.payloads[i])
            journal.clear()
            apply(state, seq, event)
            if seq > after:
                steps.append(Step(seq, event, [m for op, m in journal if op == "+"],
                                  [m for op, m in journal if op == "-"]))
                if len(steps) == limit:
                    break
        return steps, session.head.last_seq

    async def client_events(self, bot: str, session_id: str, until: int) -> bytes:
        """The session's events up to ``until`` as clients see them (``to_client``), as one JSON array.

        Each event's client form is made once, the first time a body asks for it, and kept beside its
        stored bytes: a later body up to any sequence is a join of kept bytes, with no decoding."""
        session = await self._session(bot, session_id, until=until)
        end = bisect.bisect_right(session.seqs, until)
        shown = session.shown
        for i in range(end):
            if shown[i] is None:
                form = to_client(decode(session.payloads[i]), session.seqs[i])
                for name in OPTIONAL_METADATA:  # the REST body names them always (``EventMetadata``)
                    form["metadata"].setdefault(name, None)
                data = to_json(form)
                shown[i] = data
                session.stored += len(data)
        self._trim()
        return b"[" + b",".join(shown[:end]) + b"]"  # type: ignore[arg-type]  (all made just above)

    def forget(self, bot: str, session_id: str) -> None:
        self._cache.pop((bot, session_id), None)

    async def _session(self, bot: str, session_id: str, until: int | None = None) -> _Session:
        """The session's stored log and snapshots, caught up with its log, or (``until``) at least up to
        that sequence: a question about an early point of a long session that was never read waits for
        its log up to that point only, and one about a point read already reads nothing."""
        key = (bot, session_id)
        session = self._cache.get(key)
        if session is None:
            session = _Session(head=SessionState(bot=bot, session_id=session_id))
            session.keep()
            self._cache[key] = session
        self._cache.move_to_end(key)
        async with session.lock:
            before = session.head.last_seq
            tombstones = getattr(self.events, "tombstones", None)  # the gateway's log watches them
            if until is not None and 0 < until <= before and tombstones is not None:
                # Read already, and a deletion is known without a read: nothing to ask the log.
                if tombstones.deleted(bot, session_id):
                    self.forget(bot, session_id)
                    session = _Session(head=SessionState(bot=bot, session_id=session_id))
                    session.keep()
                return session
            if before == 0:  # a first read: space the snapshots out by the length of the log
                count = await self.events.count(bot, session_id)
                session.every = max(MIN_EVERY, -(-count // SNAPSHOTS))
            async for batch in self.events.scan(bot, session_id, after=before, until=until, raw=True):
                for seq, payload in batch:
                    apply(session.head, seq, decode(payload))
                    session.seqs.append(seq)
                    session.payloads.append(payload)
                    session.shown.append(None)
                    session.stored += len(payload)
                    session.since += 1
                    if session.since >= session.every:
                        session.keep()
                if len(session.snapshots) > 2 * SNAPSHOTS:  # a session that kept growing: thin them out
                    session.snapshots = session.snapshots[:1] + session.snapshots[2::2]
                    session.every *= 2
            if session.head.last_seq == before and before and await self.events.last_seq(bot, session_id) == 0:
                self.forget(bot, session_id)  # deleted: start over if it is ever asked about again
                session = _Session(head=SessionState(bot=bot, session_id=session_id))
                session.keep()
        self._trim()
        return session

    def _trim(self) -> None:
        """Drop the sessions least recently asked about while over the budget (never the newest)."""
        total = sum(s.weight for s in self._cache.values())
        while len(self._cache) > 1 and (total > self.budget or len(self._cache) > self.sessions):
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.weight


def _entries(state: SessionState) -> int:
    return (len(state.seen_markers) + len(state.finished) + len(state.effects) + len(state.closed_requests)
            + len(state.blocked))
