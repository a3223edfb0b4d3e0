"""What the executor knows of each session's log: a cached fold, brought up to date before each run.

Before a work item runs, first delivery or not, the executor must know whether its firing already ended:
a second work message for one firing comes from a scheduler that restarted or lost its cache, a rival
scheduler, a lease check, or a redelivery at any age, long after JetStream's duplicate window. So every
run starts with a read of the session's subject from the cached fold's last sequence.

One read serves every caller that asked before it began (single flight per session): a fan-out of 1,000
work items of one session costs a few reads, each event is read and folded once, and a caller is never
answered from a read that began before it asked (which could miss the end of its firing).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from petribus.bus import EventLog
from petribus.core import SessionState, fold

Key = tuple[str, str]


class SessionFolds:
    def __init__(self, events: EventLog, *, size: int = 1000) -> None:
        self.events = events
        self.size = size
        self._states: OrderedDict[Key, SessionState] = OrderedDict()
        self._waiting: dict[Key, list[asyncio.Future[SessionState]]] = {}
        self._reading: dict[Key, asyncio.Task[None]] = {}
        self.reads = 0  # for the curious (and the tests)

    async def current(self, bot: str, session_id: str) -> SessionState:
        """The session's fold as of a read of its log that began after this call.

        The state is shared and updated in place by later reads: use it before the next ``await``.
        """
        key = (bot, session_id)
        waiter: asyncio.Future[SessionState] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(waiter)
        if key not in self._reading:
            self._reading[key] = asyncio.create_task(self._refresh(key), name=f"fold:{session_id}")
        return await waiter

    async def _refresh(self, key: Key) -> None:
        try:
            while waiters := self._waiting.pop(key, None):
                try:
                    state = await self._read(key)
                except Exception as exc:
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                for w in waiters:
                    if not w.done():
                        w.set_result(state)
        finally:
            del self._reading[key]

    async def _read(self, key: Key) -> SessionState:
        state = self._states.get(key) or SessionState()
        events = await self.events.read(*key, after=state.last_seq)
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
