"""SessionQueues: a session's items in order, sessions in parallel, batched or one at a time, idle for drain."""

from __future__ import annotations

import asyncio

from petribus.session_queues import Key, SessionQueues

A: Key = ("bot", "a")
B: Key = ("bot", "b")


async def test_a_session_is_served_in_order_and_a_burst_arrives_as_one_batch() -> None:
    gate = asyncio.Event()
    served: list[tuple[str, list[int]]] = []
    released: list[int] = []

    async def serve(key: Key, items: list[int]) -> None:
        served.append((key[1], items))
        await gate.wait()

    queues: SessionQueues[int] = SessionQueues(serve, done=lambda items: released.extend(items))
    queues.put(A, 1)
    await asyncio.sleep(0)  # the task takes item 1 and blocks in serve
    for i in (2, 3, 4):
        queues.put(A, i)  # arrive while 1 is being served
    assert list(queues.waiting(A)) == [2, 3, 4]
    gate.set()
    await queues.idle()

    assert served == [("a", [1]), ("a", [2, 3, 4])]
    assert released == [1, 2, 3, 4] and len(queues) == 0


async def test_one_at_a_time_serves_each_item_alone() -> None:
    served: list[list[int]] = []

    async def serve(key: Key, items: list[int]) -> None:
        served.append(items)
        await asyncio.sleep(0)

    queues: SessionQueues[int] = SessionQueues(serve, one_at_a_time=True)
    for i in range(5):
        queues.put(A, i)
    await queues.idle()

    assert served == [[0], [1], [2], [3], [4]]


async def test_a_slow_session_never_holds_back_another() -> None:
    slow = asyncio.Event()
    fast_done = asyncio.Event()

    async def serve(key: Key, items: list[str]) -> None:
        if key == A:
            await slow.wait()
        else:
            fast_done.set()

    queues: SessionQueues[str] = SessionQueues(serve)
    queues.put(A, "stuck")
    queues.put(B, "quick")
    await asyncio.wait_for(fast_done.wait(), 5)  # B is served while A still waits

    assert len(queues) == 1  # only A's task is left
    slow.set()
    await queues.idle()
    assert len(queues) == 0


async def test_a_failing_step_is_logged_and_the_session_goes_on() -> None:
    served: list[int] = []
    released: list[int] = []

    async def serve(key: Key, items: list[int]) -> None:
        served.extend(items)
        if items == [1]:
            raise RuntimeError("boom")

    queues: SessionQueues[int] = SessionQueues(serve, one_at_a_time=True, done=released.extend)
    queues.put(A, 1)
    queues.put(A, 2)
    await queues.idle()

    assert served == [1, 2] and released == [1, 2]


async def test_an_item_after_the_task_ended_starts_a_new_task() -> None:
    served: list[int] = []

    async def serve(key: Key, items: list[int]) -> None:
        served.extend(items)

    queues: SessionQueues[int] = SessionQueues(serve)
    queues.put(A, 1)
    await queues.idle()
    queues.put(A, 2)
    await queues.idle()

    assert served == [1, 2]


async def test_cancelling_a_task_gives_back_what_it_never_served() -> None:
    started = asyncio.Event()
    released: list[int] = []
    tasks: list[asyncio.Task[None]] = []

    async def serve(key: Key, items: list[int]) -> None:
        started.set()
        await asyncio.Event().wait()

    def spawn(coro, name):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro, name=name)
        tasks.append(task)
        return task

    queues: SessionQueues[int] = SessionQueues(serve, one_at_a_time=True, done=released.extend, spawn=spawn)
    queues.put(A, 1)
    queues.put(A, 2)
    await started.wait()
    tasks[0].cancel()
    await asyncio.wait(tasks)
    await queues.idle()

    assert sorted(released) == [1, 2] and len(queues) == 0
