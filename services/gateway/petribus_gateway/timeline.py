"""A session's past, fast: snapshots of its fold kept in memory, so that the state at any sequence and
any page of its history cost a short fold from the nearest snapshot, never a fold from zero.

The first question about a session reads its log once, folding it batch by batch and keeping a copy
of the state every ``every`` events (1,000, or more for a long session so that it keeps at most
``SNAPSHOTS`` copies). Later questions read only the events between the nearest snapshot and the
sequence asked for (at most ``every``), and what was appended since the last question.

Memory: a copy of a state holds sets that grow with the log (every marker and firing ever seen, to
ignore duplicates), so a snapshot's weight is counted as the entries of those sets, and the sessions
least recently asked about are dropped while the cache holds more than ``BUDGET`` entries in all
(about 100 MB) or more than ``SESSIONS`` sessions; the one being asked about is always kept. A
deleted session is forgotten when its log is found empty.

The log is the only truth: a snapshot is the fold of a prefix of it, and a prefix never changes.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from petribus.bus import EventLog
from petribus.core import SessionState, apply
from petribus.events import Event, Marker

SNAPSHOTS = 32
MIN_EVERY = 1_000
SESSIONS = 16
BUDGET = 2_000_000  # set entries kept in snapshots, over all sessions (~50 bytes each)

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
    snapshots: list[SessionState] = field(default_factory=list)  # ascending last_seq; the first is empty
    since: int = 0  # events folded into head since the newest snapshot
    every: int = MIN_EVERY
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def keep(self) -> None:
        self.snapshots.append(self.head.copy())
        self.since = 0

    @property
    def weight(self) -> int:
        return sum(_weight(s) for s in self.snapshots) + _weight(self.head)

    def nearest(self, seq: int) -> SessionState:
        """The newest snapshot folded up to ``seq`` or before it."""
        i = bisect.bisect_right([s.last_seq for s in self.snapshots], seq) - 1
        return self.snapshots[max(i, 0)]


class Timeline:
    def __init__(self, events: EventLog, *, sessions: int = SESSIONS, budget: int = BUDGET) -> None:
        self.events = events
        self.sessions = sessions
        self.budget = budget
        self._cache: OrderedDict[Key, _Session] = OrderedDict()

    async def state_at(self, bot: str, session_id: str, at: int | None = None) -> SessionState:
        """The session's state after its events up to ``at`` (None: all of them), as a state of the
        caller's own. Its ``last_seq`` is 0 when the session has no events up to ``at``."""
        session = await self._session(bot, session_id)
        if at is None or at >= session.head.last_seq:
            return session.head.copy()
        state = session.nearest(at).copy()
        if at > state.last_seq:
            async for batch in self.events.scan(bot, session_id, after=state.last_seq, until=at):
                for seq, event in batch:
                    apply(state, seq, event)
        return state

    async def history(self, bot: str, session_id: str, *, after: int, limit: int) -> tuple[list[Step], int]:
        """Up to ``limit`` steps after ``after``, each with the markers it added to and took from the
        marking; and the session's last sequence."""
        session = await self._session(bot, session_id)
        state = session.nearest(after).copy()
        steps: list[Step] = []
        journal: list[tuple[str, Marker]] = []
        state.journal = journal
        last = session.head.last_seq
        if state.last_seq < last:
            async for batch in self.events.scan(bot, session_id, after=state.last_seq, until=last):
                for seq, event in batch:
                    journal.clear()
                    apply(state, seq, event)
                    if seq > after:
                        steps.append(Step(seq, event, [m for op, m in journal if op == "+"],
                                          [m for op, m in journal if op == "-"]))
                        if len(steps) == limit:
                            return steps, last
        return steps, last

    def forget(self, bot: str, session_id: str) -> None:
        self._cache.pop((bot, session_id), None)

    async def _session(self, bot: str, session_id: str) -> _Session:
        """The session's snapshots, caught up with its log."""
        key = (bot, session_id)
        session = self._cache.get(key)
        if session is None:
            session = _Session(head=SessionState(bot=bot, session_id=session_id))
            session.keep()
            self._cache[key] = session
        self._cache.move_to_end(key)
        async with session.lock:
            before = session.head.last_seq
            if before == 0:  # a first read: space the snapshots out by the length of the log
                count = await self.events.count(bot, session_id)
                session.every = max(MIN_EVERY, -(-count // SNAPSHOTS))
            async for batch in self.events.scan(bot, session_id, after=before):
                for seq, event in batch:
                    apply(session.head, seq, event)
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


def _weight(state: SessionState) -> int:
    return (len(state.seen_markers) + len(state.finished) + len(state.effects) + len(state.closed_requests)
            + len(state.blocked))

