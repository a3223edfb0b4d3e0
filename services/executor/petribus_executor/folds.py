"""What the executor knows of each session's log: a cached fold, brought up to date before each run.

Before a work item runs, first delivery or not, the executor must know whether its firing already ended:
a second work message for one firing comes from a scheduler that restarted or lost its cache, a rival
scheduler, a lease check, or a redelivery at any age, long after JetStream's duplicate window. So every
run starts with a read of the session's subject from the cached fold's last sequence.

One read serves every caller that asked before it began (single flight per session): a fan-out of 1,000
work items of one session costs a few reads, each event is read and folded once, and a caller is never
answered from a read that began before it asked (which could miss the end of its firing).

Everything about a firing comes after its claim (``fired_seq``), so the fold need not start at the
beginning of the log: a session first seen here is folded from just before the oldest claim asked
about, and a cache that has fallen far behind a newer claim (a join claimed after 2,000 events of its
inputs' runs) is started again just before it instead of reading all that. Such a state takes claims on
trust (``SessionState.after``); a caller whose claim is older than the state's start gets a state that
reaches back to it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from petribus.bus import EventLog
from petribus.core import SessionState, fold

Key = tuple[str, str]
RESTART_GAP = 256  # events behind a claim past which a cache starts again at the claim


@dataclass
class _Waiter:
    since: int  # the caller's claim: the state must have folded it
    answer: asyncio.Future[SessionState]


class SessionFolds:
    def __init__(self, events: EventLog, *, size: int = 1000) -> None:
        self.events = events
        self.size = size
        self._states: OrderedDict[Key, SessionState] = OrderedDict()
        self._waiting: dict[Key, list[_Waiter]] = {}
        self._reading: dict[Key, asyncio.Task[None]] = {}
        self.reads = 0  # for the curious (and the tests)
        self.restarts = 0

    async def current(self, bot: str, session_id: str, since: int = 1) -> SessionState:
        """The session's fold, including the event at ``since`` and everything up to a read of its log
        that began after this call.

        The state is shared and updated in place by later reads: use it before the next ``await``.
        """
        key = (bot, session_id)
        waiter = _Waiter(max(1, since), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(key, []).append(waiter)
        if key not in self._reading:
            self._reading[key] = asyncio.create_task(self._refresh(key), name=f"fold:{session_id}")
        return await waiter.answer

    async def _refresh(self, key: Key) -> None:
        try:
            while waiters := self._waiting.pop(key, None):
                try:
                    state = await self._read(key, min(w.since for w in waiters))
                except Exception as exc:
                    for w in waiters:
                        if not w.answer.done():
                            w.answer.set_exception(exc)
                    continue
                for w in waiters:
                    if not w.answer.done():
                        w.answer.set_result(state)
        finally:
            del self._reading[key]

    async def _read(self, key: Key, since: int) -> SessionState:
        state = self._states.get(key)
        if state is None or state.after >= since or since - state.last_seq > RESTART_GAP:
            if state is not None:
                self.restarts += 1
            state = SessionState(bot=key[0], session_id=key[1], after=since - 1, last_seq=since - 1)
        # At least to the claim: a replica behind the stream's leader may answer a direct get without it,
        # and a firing missing from the fold would be acked as not runnable (and wait for a lease check).
        events = await self.events.read(*key, after=state.last_seq, at_least=since)
        self.reads += 1
        fold(events, state)
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.size:
            self._states.popitem(last=False)
        return state

    def close(self) -> None:
        for task in self._reading.values():
            task.cancel()
