"""Work for a pool that no executor serves: it waits, and the session is told once.

The scheduler sends a firing's work to its pool (``pb.work.<pool>.…``) whether or not an executor
serves it: PB_WORK is a work queue, so the item stays there, and the pool's durable consumer, created
by the first executor that joins (delivering everything from the start), hands it over; the firing then
runs. Nothing times out meanwhile: the session's lease sees the item present and leaves it alone.

A user would otherwise see nothing happen. So when a firing's work has gone to a pool that the registry
(``petribus.registry``) shows no live executor for, and still none serves it a grace period later (the
registry's TTL, three heartbeats: long enough for an executor to restart, or for ``petribus serve`` to
start its own), the session gets one ``error`` event (code ``pool_missing``) naming the pool and the
command that starts an executor for it. One per session and pool while its firings wait, however many
firings wait, however often the session is swept or leased, and whichever scheduler looks:

- this process remembers what it said, until the pool is served again;
- another process (or this one after a restart) first reads the session's log from the oldest waiting
  firing's claim on: an ``error`` of this code for the same pool there means it was said already;
- the event's Msg-Id is made from the session, the pool and that oldest firing, so two schedulers
  racing to say it land it once.

A firing that an executor already started is not waiting for a pool; nor is one whose pool has an
executor that is busy. Work is checked when it is sent, and again at every lease check of its session
(``PETRIBUS_WORK_LEASE_S``), which notices a pool whose executors all left after its work was sent.

The notice is decided off the session's queue, on a fold of its own read of the log: it only appends
an event (which the scheduler folds when it is delivered, like any other) and never touches the
scheduler's cached state.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from petribus.bus import EventLog
from petribus.core import Firing, SessionState, fold
from petribus.events import ErrorEvent
from petribus.net import Net
from petribus.registry import Registry, RegistryView, start_hint, ttl_for

POOL_MISSING = "pool_missing"
Key = tuple[str, str, str]  # bot, session, pool


def _pool(net: Net, f: Firing) -> str:
    return net.transition(f.transition).pool if net.has_transition(f.transition) else "cpu"


def _waiting(net: Net, state: SessionState, pool: str) -> list[Firing]:
    """The session's firings whose work waits in ``pool`` for an executor to start it, oldest first."""
    return sorted((f for f in state.in_flight.values() if f.status == "claimed" and _pool(net, f) == pool),
                  key=lambda f: f.fired_seq)


class MissingPools:
    """Tells a session, once, that its work waits for a pool nobody serves."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.events: EventLog | None = None
        self.registry: Registry | None = None
        self.view: RegistryView | None = None  # until started, no pool is reported missing
        self.grace_s = 15.0
        self.reported: OrderedDict[Key, None] = OrderedDict()
        self._due: dict[Key, asyncio.Task[None]] = {}  # pools found unserved, looked at again after the grace
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, registry: Registry, events: EventLog) -> None:
        self.events = events
        self.registry = registry
        self.grace_s = ttl_for(registry.heartbeat_s)
        self.view = await registry.watch(on_change=self._changed)

    async def stop(self) -> None:
        for task in list(self._due.values()):
            task.cancel()
        if self._due:
            await asyncio.wait(list(self._due.values()))
        if self.view is not None:
            await self.view.stop()

    async def idle(self) -> None:
        """Until no pool is waiting out its grace here (for tests)."""
        await self._idle.wait()

    def _changed(self, info: Any, key: str) -> None:
        if info is None or not self.reported:
            return
        served = set(info.pools)
        for k in [k for k in self.reported if k[2] in served]:
            del self.reported[k]  # served now: a later stretch without an executor is told again
            self.log.info("pool served again", pool=k[2], session_id=k[1], executor=info.instance)

    def check(self, net: Net, state: SessionState, firing_ids: Iterable[str] | None = None) -> None:
        """Look again after the grace at each pool that claimed firings of the session (those in
        ``firing_ids``, or all) wait for with no executor, unless the session was told already."""
        if self.view is None:
            return
        served: dict[str, bool] = {}
        for fid in state.in_flight.keys() if firing_ids is None else firing_ids:
            f = state.in_flight.get(fid)
            if f is None or f.status != "claimed":
                continue
            pool = _pool(net, f)
            if pool not in served:
                served[pool] = self.view.serves(pool)
                key = (net.bot, state.session_id, pool)
                if not served[pool] and key not in self.reported and key not in self._due:
                    self._due[key] = asyncio.create_task(self._after_grace(net, key), name=f"pool-missing:{pool}")
                    self._idle.clear()

    async def _after_grace(self, net: Net, key: Key) -> None:
        try:
            await asyncio.sleep(self.grace_s)
            if await self._tell(net, key):
                self.reported[key] = None
                while len(self.reported) > 100_000:
                    self.reported.popitem(last=False)
        except Exception as exc:  # the bus is away: the work still waits; the next check says it
            self.log.warning("could not tell a session its pool has no executor", session_id=key[1], pool=key[2],
                             error=repr(exc))
        finally:
            self._due.pop(key, None)
            if not self._due:
                self._idle.set()

    async def _tell(self, net: Net, key: Key) -> bool:
        """Tell the session, unless the pool is served now or nothing waits for it any more. Whether the
        pool needs no more telling (told, by anyone)."""
        assert self.events is not None and self.registry is not None and self.view is not None
        bot, session_id, pool = key
        # Ask the registry itself, not only the watch: it may lag an executor that has just joined.
        if self.view.serves(pool) or pool in {p for info in await self.registry.list() for p in info.pools}:
            return False
        state = fold(await self.events.read(bot, session_id))
        waiting = _waiting(net, state, pool)
        if not waiting:
            return False  # started or ended meanwhile
        oldest = waiting[0]
        since = await self.events.read(bot, session_id, after=oldest.fired_seq)
        if any(isinstance(e, ErrorEvent) and e.code == POOL_MISSING and e.transition is not None
               and net.has_transition(e.transition) and net.transition(e.transition).pool == pool
               for _, e in since):
            return True  # said already, by this process before a restart or by another scheduler
        error = ErrorEvent(
            bot=bot, session_id=session_id, firing_id=oldest.id, transition=oldest.transition, cause=oldest.id,
            code=POOL_MISSING,
            message=f"No executor serves pool {pool!r}, so transition {oldest.transition!r} waits "
                    f"({len(waiting)} firing(s) now). Its work is kept and runs as soon as an executor of the "
                    f"pool joins: start one with `{start_hint(pool)}`.")
        if await self.events.append_once(error, msg_id=f"{POOL_MISSING}:{session_id}:{pool}:{oldest.id}"):
            self.log.warning("work waits for a pool with no executor", session_id=session_id, pool=pool,
                             transition=oldest.transition, firings=len(waiting))
        return True
