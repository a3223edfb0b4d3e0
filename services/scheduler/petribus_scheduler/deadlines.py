"""Confirmation deadlines as durable timers: a pending confirmation is rejected when its time is up.

When a ``confirm_transition`` asks the user, the scheduler also publishes a :class:`ConfirmDeadline`
to ``PB_TIMERS`` (Msg-Id ``deadline:<firing>``, so however many schedulers publish it, one lands), a
durable timer (``timers.py``) that whichever scheduler is alive handles when it is due. Then the session
is folded: a firing still awaiting confirmation is rejected with ``reason="timeout"`` (through
``answers.answer_once``, so a user's answer racing it leaves exactly one answer in the log) and its
markers go back. The deadline itself is read from the log (``confirm_transition.ts + timeout``).
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client as NATS

from petribus import subjects
from petribus.answers import answer_once, to_confirmation
from petribus.bus import EventLog
from petribus.core import SessionState
from petribus.errors import AlreadyAnswered, UnknownRequest
from petribus.events import RejectTransition, _Event
from petribus_scheduler.timers import DurableTimers, Timer


class ConfirmDeadline(Timer):
    """Due when the confirmation times out (the log has the exact value)."""

    firing_id: str

    def msg_id(self) -> str:
        return f"deadline:{self.firing_id}"

    def subject(self) -> str:
        return subjects.confirm_deadlines()


class _NotDue(Exception):
    def __init__(self, due: float) -> None:
        self.due = due


class Deadlines(DurableTimers[ConfirmDeadline]):
    """Wakes up when a confirmation's deadline is due and rejects it if it still waits."""

    model = ConfirmDeadline
    durable = subjects.SCHEDULER_TIMERS_DURABLE
    filter_subject = subjects.confirm_deadlines()

    def __init__(self, nc: NATS, events: EventLog, log: Any, *, ack_wait_s: float, retry_s: float = 1.0,
                 retry_max_s: float = 60.0) -> None:
        super().__init__(nc, log, ack_wait_s=ack_wait_s, retry_s=retry_s, retry_max_s=retry_max_s)
        self.events = events
        self.expired = 0

    async def fire(self, item: ConfirmDeadline) -> float | None:
        """Reject the confirmation if it still waits and its time is up; its deadline if not yet up."""
        reject = RejectTransition(bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                  reason="timeout")
        answer = to_confirmation(reject)

        def decide(state: SessionState) -> _Event:
            f = state.in_flight.get(item.firing_id)
            if f is not None and f.status == "awaiting_confirmation":
                due = f.confirm_deadline
                if due is None:
                    raise AlreadyAnswered("this confirmation has no time limit")
                if due > time.time():
                    raise _NotDue(due)
            return answer(state)

        try:
            seq, _ = await answer_once(self.events, item.bot, item.session_id, decide, target=item.firing_id)
        except _NotDue as early:
            return early.due
        except (AlreadyAnswered, UnknownRequest):
            return None  # answered in time, or the session is gone
        self.expired += 1
        self.log.info("confirmation timed out; markers returned", session_id=item.session_id,
                      firing_id=item.firing_id, seq=seq)
        return None
