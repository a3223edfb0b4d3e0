"""Work leases: a firing in flight whose work item was lost is sent again, within ``work_lease_s``.

A firing in flight (claimed, or started) has its work item on ``pb.work.<pool>.<bot>.<session>.<firing>``
in the work-queue stream PB_WORK until an executor acks it, which it does only once the outcome is in
the log. So "in flight in the log, no item in PB_WORK" means the item is lost (a server crash inside
the sync interval, an operator's purge) and nobody will ever run the firing unless it is sent again.

Each session with firings in flight has one durable :class:`Lease` timer on PB_TIMERS (``timers.py``),
keyed by its oldest firing in flight. The scheduler arms it when a dispatch sends that oldest firing,
i.e. when the session goes from nothing in flight to something (unless the same process armed or
renewed the session's lease less than half a period ago: that one is still pending), and on each
process's first decision for the session (so a lease lost with a crashed server's unsynced writes comes
back): at most a few pipelined publishes per session and period, never one per firing. When the lease
is due, whichever scheduler is alive checks the session in its session queue (``Scheduler.renew``):
fold it up to now, list the session's items in PB_WORK (one request), and send again the work of every
firing in flight whose item is gone (Msg-Id ``work:<firing>:<round>``, so two schedulers checking in
the same period send one). Then the lease is re-armed while anything is in flight (moved to a new key
when the oldest firing ended), and dropped when nothing is.

Invariant: while a session has a firing in flight, some lease of it is pending; so a lost work item is
sent again at most ``work_lease_s`` after it was lost (plus the timers consumer's ack wait if the
scheduler checking it dies). Timers stay O(sessions with work in flight). A work item sent again while
the first is in fact still running somewhere is harmless: the executor skips a firing the log shows
ended, and a firing's effects carry Msg-Ids of their own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

from petribus import subjects
from petribus_scheduler.timers import DurableTimers, Timer


class Lease(Timer):
    """The session's check for lost work items, due every ``work_lease_s`` while it has firings in flight."""

    firing_id: str  # the session's oldest firing in flight when the lease was armed: its key

    def msg_id(self) -> str:
        return f"lease:{self.bot}:{self.session_id}:{self.firing_id}"

    def subject(self) -> str:
        return subjects.lease(self.bot, self.session_id)


class Leases(DurableTimers[Lease]):
    """``renew(lease)`` checks the session (re-sending lost work) and says when the lease is due again:
    None when it is done (nothing in flight, or a lease keyed by the oldest firing took its place)."""

    model = Lease
    durable = subjects.SCHEDULER_LEASES_DURABLE
    filter_subject = subjects.leases()

    def __init__(self, nc: NATS, log: Any, renew: Callable[[Lease], Awaitable[float | None]], *,
                 period_s: float, ack_wait_s: float, retry_s: float = 1.0, retry_max_s: float = 60.0) -> None:
        super().__init__(nc, log, ack_wait_s=ack_wait_s, retry_s=retry_s, retry_max_s=retry_max_s)
        self.renew = renew
        self.period_s = period_s

    def lease(self, bot: str, session_id: str, firing_id: str) -> Lease:
        return Lease(bot=bot, session_id=session_id, firing_id=firing_id, due=time.time() + self.period_s)

    async def fire(self, timer: Lease) -> float | None:
        return await self.renew(timer)
