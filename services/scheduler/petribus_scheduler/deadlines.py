"""Confirmation deadlines as durable timers: a pending confirmation is rejected when its time is up.

When a ``confirm_transition`` asks the user, the scheduler also publishes a :class:`ConfirmDeadline`
to ``PB_TIMERS`` (Msg-Id ``deadline:<firing>``, so however many schedulers publish it, one lands).
Every scheduler shares one durable consumer of it. A timer delivered before it is due is nak'ed with
a delay of what is left: JetStream hands it back when it is due, to whichever scheduler is alive
then; nothing polls, and no process has to outlive the wait. When due, the session is folded: a
firing still awaiting confirmation is rejected with ``reason="timeout"`` (through
``answers.answer_once``, so a user's answer racing it leaves exactly one answer in the log) and its
markers go back. The deadline itself is read from the log (``confirm_transition.ts + timeout``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from petribus import subjects
from petribus.answers import answer_once, to_confirmation
from petribus.bus import EventLog
from petribus.consumer import PullConsumer
from petribus.core import SessionState
from petribus.errors import AlreadyAnswered, UnknownRequest
from petribus.events import RejectTransition, _Event

IN_FLIGHT = 64  # timers handled at once by one scheduler
MIN_DELAY_S = 0.05


class ConfirmDeadline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bot: str
    session_id: str
    firing_id: str
    due: float = Field(description="Unix time the confirmation times out (the log has the exact value).")

    def msg_id(self) -> str:
        return f"deadline:{self.firing_id}"


class _NotDue(Exception):
    def __init__(self, due: float) -> None:
        self.due = due


class Deadlines:
    """The consumer side: wakes up when a deadline is due and rejects what is still pending."""

    def __init__(self, nc: NATS, events: EventLog, log: Any, *, ack_wait_s: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.events = events
        self.log = log
        self.ack_wait_s = ack_wait_s
        self.consumer: PullConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.expired = 0

    async def start(self) -> None:
        await self.js.add_consumer(
            subjects.TIMERS_STREAM,
            ConsumerConfig(
                durable_name=subjects.SCHEDULER_TIMERS_DURABLE, filter_subject=subjects.confirm_deadlines(),
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
                # Waiting timers are nak'ed (pending redelivery) and count as unacknowledged.
                max_ack_pending=-1,
            ),
        )
        self.consumer = PullConsumer(self.nc, subjects.TIMERS_STREAM, subjects.SCHEDULER_TIMERS_DURABLE,
                                     max_inflight=IN_FLIGHT)
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def publish(self, deadlines: list[ConfirmDeadline]) -> None:
        acks = [await self.js.publish_async(subjects.confirm_deadlines(), d.model_dump_json().encode(),
                                            headers={"Nats-Msg-Id": d.msg_id()}) for d in deadlines]
        await asyncio.gather(*acks)

    async def run(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(IN_FLIGHT):
                task = asyncio.create_task(self._on_timer(msg), name="deadline")
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.consumer is not None:
            self.consumer.release()

    async def _on_timer(self, msg: Msg) -> None:
        try:
            item = ConfirmDeadline.model_validate_json(msg.data)
        except ValidationError as exc:
            self.log.error("malformed deadline terminated", error=str(exc)[:300])
            await msg.term()
            return
        try:
            due: float | None = item.due
            if due is not None and due <= time.time():
                due = await self._expire(item)
            if due is not None:
                await msg.nak(delay=max(MIN_DELAY_S, due - time.time()))
                return
            await msg.ack()
        except Exception as exc:  # the bus is down: try again shortly
            self.log.error("deadline not handled; will retry", session_id=item.session_id,
                           firing_id=item.firing_id, error=repr(exc))
            await msg.nak(delay=1.0)

    async def _expire(self, item: ConfirmDeadline) -> float | None:
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
