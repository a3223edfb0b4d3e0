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
