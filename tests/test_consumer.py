"""The pull consumer keeps its whole window of messages in hand, whatever order credits come back in."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from petribus.consumer import PullConsumer


async def test_a_consumer_fills_its_window_without_waiting_for_a_release(nc: Any) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
    await js.add_consumer("T", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT,
                                              max_ack_pending=10_000))
    consumer = PullConsumer(nc, "T", "c", max_inflight=100)
    await consumer.start()
    try:
        # One message in and out: the open request now has 99 credits left and the window has room for 100.
        await js.publish("t.x", b"first")
        [first] = await asyncio.wait_for(consumer.next_batch(10), 10)
        await first.ack()
        consumer.release()
        for i in range(100):
            await js.publish("t.x", str(i).encode())
        held: list[Any] = []
        async with asyncio.timeout(10):  # nothing is released: the 100th comes from a new request
            while len(held) < 100:
                held += await consumer.next_batch(100)
        assert [m.data for m in held] == [str(i).encode() for i in range(100)]
    finally:
        await consumer.stop()


async def test_a_consumer_with_a_handler_hands_each_message_as_it_is_read_within_its_window(nc: Any) -> None:
    """``handle``: each message goes to the handler from the connection's reading task, in order, and no
    more than the window is in hand until the holder releases some."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="H", subjects=["h.>"]))
    await js.add_consumer("H", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT,
                                              max_ack_pending=10_000))
    handed: list[Any] = []
    in_read_loop: list[bool] = []
    changed = asyncio.Event()

    def handle(msg: Any) -> None:
        handed.append(msg)
        in_read_loop.append(asyncio.current_task() is nc._reading_task)
        changed.set()

    async def until(n: int) -> None:
        async with asyncio.timeout(10):
            while len(handed) < n:
                changed.clear()
                await changed.wait()

    consumer = PullConsumer(nc, "H", "c", max_inflight=10, handle=handle)
    await consumer.start()
    try:
        for i in range(25):
            await js.publish("h.x", str(i).encode())
        await until(10)
        await asyncio.sleep(0.3)  # room for more to arrive, were the window not kept
        assert len(handed) == 10
        for msg in handed[:10]:
            await msg.ack()
        consumer.release(10)
        await until(20)
        for msg in handed[10:20]:
            await msg.ack()
        consumer.release(10)
        await until(25)
        assert [m.data for m in handed] == [str(i).encode() for i in range(25)]
        assert all(in_read_loop)
    finally:
        await consumer.stop()
