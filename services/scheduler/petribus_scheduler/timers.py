"""Durable timers on PB_TIMERS: a message that is handled when it is due, by whichever scheduler is alive.

A timer is a small JSON message with a ``due`` time, published with a ``Nats-Msg-Id`` of its own (so
however many schedulers arm it, one lands). Every scheduler shares one durable consumer per kind of
timer. A timer delivered before it is due is nak'ed with the time left: JetStream hands it back then,
to whichever scheduler is alive; nothing polls, and no process has to outlive the wait. When due,
``fire`` acts and says what next: ``None`` (done: the timer is acked and gone) or the next due time
(the same message is nak'ed until then). A failure is logged and retried with growing pauses, counted
from the message's deliveries, so a timer that keeps failing never spins.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar, Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from petribus import subjects
from petribus.bus import Publisher
from petribus.consumer import PullConsumer

IN_FLIGHT = 64  # timers handled at once by one scheduler
MIN_DELAY_S = 0.05


class Timer(BaseModel):
    """What every timer carries; a kind adds its own fields, Msg-Id and subject."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bot: str
    session_id: str
    due: float = Field(description="Unix time the timer is due.")

    def msg_id(self) -> str:
        raise NotImplementedError

    def subject(self) -> str:
        raise NotImplementedError


T = TypeVar("T", bound=Timer)


def retry_delay(deliveries: int, *, first_s: float, max_s: float) -> float:
    """Seconds before try ``deliveries + 1``: ``first_s``, doubled per earlier delivery, at most ``max_s``."""
    return min(max_s, first_s * 2 ** min(max(deliveries, 1) - 1, 62))


class DurableTimers(Generic[T]):
    """One kind of timer: its model, its durable consumer and what it does when due."""

    model: ClassVar[type[Timer]]
    durable: ClassVar[str]
    filter_subject: ClassVar[str]
    stream: ClassVar[str] = subjects.TIMERS_STREAM

    def __init__(self, nc: NATS, log: Any, *, ack_wait_s: float, retry_s: float = 1.0,
                 retry_max_s: float = 60.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.publisher = Publisher(nc, self.js)  # rides out a bus outage: same Msg-Id on every try
        self.log = log
        self.ack_wait_s = ack_wait_s
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.consumer: PullConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._ensure()
        self.consumer = PullConsumer(self.nc, self.stream, self.durable, max_inflight=IN_FLIGHT,
                                     ensure=self._ensure)
        await self.consumer.start()

    async def _ensure(self) -> None:
        """Create or update the durable (at start, and again if a fail-over lost it)."""
        await self.js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable, filter_subject=self.filter_subject,
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
                # Waiting timers are nak'ed (pending redelivery) and count as unacknowledged.
                max_ack_pending=-1,
            ),
        )

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def arm(self, timer: T) -> asyncio.Future[Any]:
        """Publish ``timer`` now; the future of JetStream's ack (the caller awaits it with other sends)."""
        return await self.publisher.publish_soon(timer.subject(), timer.model_dump_json().encode(),
                                                 msg_id=timer.msg_id())

    async def publish(self, timers: list[T]) -> None:
        await asyncio.gather(*[await self.arm(t) for t in timers])

    async def run(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(IN_FLIGHT):
                task = asyncio.create_task(self._on_timer(msg), name=self.durable)
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.consumer is not None:
            self.consumer.release()

    async def fire(self, timer: T) -> float | None:
        """Act on a due timer: ``None`` when it is done, else when it is due again (Unix time)."""
        raise NotImplementedError

    async def _on_timer(self, msg: Msg) -> None:
        try:
            timer: Any = self.model.model_validate_json(msg.data)  # a T
        except ValidationError as exc:
            self.log.error("malformed timer terminated", durable=self.durable, error=str(exc)[:300])
            await msg.term()
            return
        try:
            due: float | None = timer.due
            if due is not None and due <= time.time():
                due = await self.fire(timer)
            if due is not None:
                await msg.nak(delay=max(MIN_DELAY_S, due - time.time()))
                return
            await msg.ack()
        except Exception as exc:  # the bus is down, or the session cannot be folded: later, more slowly
            retry = retry_delay(msg.metadata.num_delivered or 1, first_s=self.retry_s, max_s=self.retry_max_s)
            self.log.error("timer not handled; will retry", durable=self.durable, session_id=timer.session_id,
                           error=repr(exc), retry_in_s=retry)
            try:
                await msg.nak(delay=retry)
            except Exception as nak_exc:  # disconnected: JetStream redelivers it after ack_wait anyway
                self.log.warning("could not nak a timer", error=repr(nak_exc))
