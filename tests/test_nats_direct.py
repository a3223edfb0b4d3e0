"""petribus.nats_direct against a real nats-server: handlers called as the connection reads each message."""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client

from petribus import bus, nats_direct  # noqa: F401  (importing bus installs the patch, as every service does)

BOUND_S = 10


async def test_the_patch_is_installed_by_importing_the_bus() -> None:
    assert nats_direct.original is not None, "nats-py no longer has Client._process_msg: drop nats_direct"
    assert Client._process_msg is nats_direct._process_msg


async def test_a_direct_handler_runs_in_the_read_loop_in_order_and_a_plain_subscription_is_untouched(
    settings,
) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        seen: list[tuple[bytes, str | None, bool]] = []
        got_all = asyncio.Event()

        def handler(msg) -> None:  # type: ignore[no-untyped-def]
            # No queue and no task of the subscription's own: the connection's reading task calls it.
            seen.append((msg.data, (msg.headers or {}).get("K"), asyncio.current_task() is nc._reading_task))
            if len(seen) == 50:
                got_all.set()

        sub = await nats_direct.subscribe(nc, "direct.>", handler)
        assert nats_direct.handled_directly(sub)
        plain: list[bytes] = []
        plain_tasks: list[bool] = []

        async def plain_cb(msg) -> None:  # type: ignore[no-untyped-def]
            plain.append(msg.data)
            plain_tasks.append(asyncio.current_task() is nc._reading_task)

        await nc.subscribe("plain", cb=plain_cb)
        for i in range(50):
            await nc.publish(f"direct.{i % 3}", str(i).encode(), headers={"K": f"v{i}"})
        await nc.publish("plain", b"p")
        await asyncio.wait_for(got_all.wait(), BOUND_S)
        await nc.flush()
        await asyncio.sleep(0.05)
        assert [(data, k) for data, k, _ in seen] == [(str(i).encode(), f"v{i}") for i in range(50)]
        assert all(in_read_loop for _, _, in_read_loop in seen)
        assert plain == [b"p"] and plain_tasks == [False]  # queued to its own task, as nats-py does
    finally:
        await nc.close()


async def test_a_message_read_before_the_mark_reaches_the_same_handler(settings) -> None:
    """What arrives between the subscription and its mark goes nats-py's way, to the same handler."""
    nc = await nats.connect(settings.nats_url)
    try:
        seen: list[tuple[bytes, bool]] = []
        sub = await nats_direct.subscribe(nc, "early", lambda msg: seen.append(
            (msg.data, asyncio.current_task() is nc._reading_task)))
        delattr(sub, nats_direct.DIRECT)  # as if read before subscribe() marked it
        await nc.publish("early", b"1")
        await nc.flush()
        async with asyncio.timeout(BOUND_S):
            while not seen:
                await asyncio.sleep(0.01)
        assert seen == [(b"1", False)]  # through the queue and the subscription's task
    finally:
        await nc.close()


async def test_a_handler_that_raises_is_reported_and_the_next_message_still_comes(settings) -> None:
    errors: list[BaseException] = []

    async def error_cb(exc: BaseException) -> None:
        errors.append(exc)

    nc = await nats.connect(settings.nats_url, error_cb=error_cb)
    try:
        seen: list[bytes] = []

        def handler(msg) -> None:  # type: ignore[no-untyped-def]
            if msg.data == b"bad":
                raise ValueError("this handler refuses 'bad'")
            seen.append(msg.data)

        await nats_direct.subscribe(nc, "raising", handler)
        for data in (b"a", b"bad", b"b"):
            await nc.publish("raising", data)
        await nc.flush()
        async with asyncio.timeout(BOUND_S):
            while len(seen) < 2:
                await asyncio.sleep(0.01)
        assert seen == [b"a", b"b"]
        assert [str(e) for e in errors] == ["this handler refuses 'bad'"]
        assert nc.is_connected
    finally:
        await nc.close()
