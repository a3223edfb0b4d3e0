"""Work for a pool that no executor serves: it waits, and the session is told once.

The scheduler sends a firing's work to its pool (``pb.work.<pool>.…``) whether or not an executor
serves it: PB_WORK is a work queue, so the item stays there, and the pool's durable consumer, created
by the first executor that joins (delivering everything from the start), hands it over; the firing then
runs. Nothing times out meanwhile: the session's lease sees the item present and leaves it alone.

A user would otherwise see nothing happen. So when a firing's work goes to a pool that the registry
(``petribus.registry``) shows no live executor for, the session gets one ``error`` event (code
``pool_missing``) naming the pool and the command that starts an executor for it. One per session and
pool while its firings wait, however many firings wait, however often the session is swept or leased,
and whichever scheduler looks:

- this process remembers what it said, until the pool is served again;
- another process (or this one after a restart) first reads the session's log from the oldest waiting
  firing's claim on: an ``error`` of this code for the same pool there means it was said already;
- the event's Msg-Id is made from the session, the pool and that oldest firing, so two schedulers
  racing to say it land it once.

A firing that an executor already started is not waiting for a pool; nor is one whose pool has an
executor that is busy. A pool whose executors all died after its work was sent is noticed by the
session's lease check (every ``PETRIBUS_WORK_LEASE_S``), which looks at every waiting firing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from petribus.bus import EventLog
from petribus.core import Firing, SessionState
from petribus.events import ErrorEvent
from petribus.net import Net
from petribus.registry import Registry, RegistryView, start_hint

POOL_MISSING = "pool_missing"


def _pool(net: Net, f: Firing) -> str:
    return net.transition(f.transition).pool if net.has_transition(f.transition) else "cpu"


class MissingPools:
    """Tells a session, once, that its work waits for a pool nobody serves."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.events: EventLog | None = None
        self.registry: Registry | None = None
        self.view: RegistryView | None = None  # until started, no pool is reported missing
        self.reported: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # (bot, session, pool)

    async def start(self, registry: Registry, events: EventLog) -> None:
        self.events = events
        self.registry = registry
        self.view = await registry.watch(on_change=self._changed)

    async def stop(self) -> None:
        if self.view is not None:
            await self.view.stop()

    def _changed(self, info: Any, key: str) -> None:
        if info is None or not self.reported:
            return
        served = set(info.pools)
        for k in [k for k in self.reported if k[2] in served]:
            del self.reported[k]  # served now: a later stretch without an executor is told again
            self.log.info("pool served again", pool=k[2], session_id=k[1], executor=info.instance)

    async def check(self, net: Net, state: SessionState, firing_ids: Any = None) -> None:
        """Tell the session about each pool its claimed firings (those in ``firing_ids``, or all) wait
        for without an executor, unless it was told already."""
        if self.view is None or self.registry is None:
            return
        ids = state.in_flight.keys() if firing_ids is None else firing_ids
        waiting: dict[str, Firing] = {}  # pool -> its oldest waiting firing among these
        served: dict[str, bool] = {}
        for fid in ids:
            f = state.in_flight.get(fid)
            if f is None or f.status != "claimed":
                continue
            pool = _pool(net, f)
            if pool not in served:
                served[pool] = self.view.serves(pool)
            if not served[pool] and (pool not in waiting or f.fired_seq < waiting[pool].fired_seq):
                waiting[pool] = f
        unsaid = [pool for pool in waiting if (net.bot, state.session_id, pool) not in self.reported]
        if unsaid:
            # The watch may lag an executor that has just joined (its entry is written before it takes
            # work): ask the registry itself before telling anyone.
            try:
                live = {p for info in await self.registry.list() for p in info.pools}
            except Exception as exc:  # the next check asks again
                self.log.warning("could not read the executor registry", error=repr(exc))
                return
            unsaid = [pool for pool in unsaid if pool not in live]
        for pool in unsaid:
            key = (net.bot, state.session_id, pool)
            # The oldest waiting firing of the pool in the whole session, not just among these.
            oldest = min((f for f in state.in_flight.values() if f.status == "claimed" and _pool(net, f) == pool),
                         key=lambda f: f.fired_seq)
            try:
                await self._tell(net, state, pool, oldest)
            except Exception as exc:  # the bus is away: the work still waits; the next check says it
                self.log.warning("could not tell the session its pool has no executor", session_id=state.session_id,
                                 pool=pool, error=repr(exc))
                continue
            self.reported[key] = None
            while len(self.reported) > 100_000:
                self.reported.popitem(last=False)

    async def _tell(self, net: Net, state: SessionState, pool: str, oldest: Firing) -> None:
        assert self.events is not None
        since = await self.events.read(net.bot, state.session_id, after=oldest.fired_seq)
        if any(isinstance(e, ErrorEvent) and e.code == POOL_MISSING and e.transition is not None
               and net.has_transition(e.transition) and net.transition(e.transition).pool == pool
               for _, e in since):
            return  # said already, by this process before a restart or by another scheduler
        waiting = sum(1 for f in state.in_flight.values() if f.status == "claimed" and _pool(net, f) == pool)
        error = ErrorEvent(
            bot=net.bot, session_id=state.session_id, firing_id=oldest.id, transition=oldest.transition,
            cause=oldest.id, code=POOL_MISSING,
            message=f"No executor serves pool {pool!r}, so transition {oldest.transition!r} waits "
                    f"({waiting} firing(s) now). Its work is kept and runs as soon as an executor of the "
                    f"pool joins: start one with `{start_hint(pool)}`.")
        # Not at an expected sequence, and not folded here: the scheduler folds it when it is delivered,
        # like any event (folding it here would hide the events read with it from its decisions).
        if await self.events.append_once(error, msg_id=f"{POOL_MISSING}:{state.session_id}:{pool}:{oldest.id}"):
            self.log.warning("work waits for a pool with no executor", session_id=state.session_id, pool=pool,
                             transition=oldest.transition, firings=waiting)
