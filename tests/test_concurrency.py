"""Many firings per worker: async firings share a worker's event loop, sync ones have a worker alone.

The pool tests drive ``WorkerPool`` directly with real worker processes (``tests/apps/concurrency.py``);
its ``on_call`` and ``on_event`` callbacks stand in for the executor's. Concurrency is proved by
barriers (every firing waits until all have arrived) and by the spans the firings report, never by
how long anything took. The last test runs the fan-out through the whole stack with default credits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from petribus.errors import SandboxCrashed, TransitionTimeout
from petribus.loader import load_bot
from petribus.settings import Settings
from petribus_executor import protocol as p
from petribus_executor.placement import Host, Placement
from petribus_executor.pool import WorkerPool
from petribus_executor.worker import Pipe, Runner

from .conftest import app
from .harness import Stack
from .test_executor import SessionLog, marking

CONCURRENCY = app("concurrency")
LOCATION = {"nap": "Nap", "sync_nap": "SyncNap", "block": "Block", "ask": "Question", "sync_ask": "SyncQuestion"}
SYNC = ("sync_nap", "sync_ask")

MakePool = Callable[..., Awaitable[WorkerPool]]


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    pools: list[WorkerPool] = []

    async def make(size: int, concurrency: int, **kw: Any) -> WorkerPool:
        pool = WorkerPool([CONCURRENCY], size, concurrency=concurrency, **kw)
        pools.append(pool)
        await pool.start()
        return pool

    yield make
    for pool in pools:
        await pool.close()


def request(transition: str, **data: Any) -> p.Request:
    return p.Request(bot="concurrency", session_id="s", firing_id=uuid.uuid4().hex, transition=transition,
                     attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, LOCATION[transition], data),))


def span(outcome: p.Outcome) -> dict[str, Any]:
    assert outcome.ok, (outcome.error_type, outcome.error, outcome.traceback)
    [(location, data)] = outcome.outputs
    assert location == "Span"
    return data


async def no_calls(kind: str, payload: Any, timeout: float | None) -> Any:
    raise AssertionError(f"unexpected context.{kind}")


def run(pool: WorkerPool, transition: str, *, timeout: float | None = None,
        on_event: Callable[[str, Any], None] = lambda kind, payload: None,
        on_call: Callable[[str, Any, float | None], Awaitable[Any]] = no_calls, **data: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(pool.run(request(transition, **data), on_event=on_event, on_call=on_call,
                                          timeout=timeout, asynchronous=transition not in SYNC))


class Arrivals:
    """Counts firings that said they are in; ``wait(n)`` returns once ``n`` have."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._changed = asyncio.Event()

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "say" and str(payload).startswith("in "):
            self.pids.append(int(str(payload).split()[1]))
            self._changed.set()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(30):
            while len(self.pids) < n:
                self._changed.clear()
                await self._changed.wait()


def placement(hosts: int, concurrency: int, size: int | None = None) -> Placement[Host]:
    placed: Placement[Host] = Placement(size or hosts, concurrency)
    for _ in range(hosts):
        placed.reserve_start()
        placed.add(Host())
    return placed


async def test_async_firings_go_to_the_least_loaded_worker_with_room() -> None:
    placed = placement(2, concurrency=2)
    a, b = placed.hosts
    leases = [placed.take(asynchronous=True) for _ in range(4)]

    assert [lease.host for lease in leases if lease] == [a, b, a, b]
    assert placed.take(asynchronous=True) is None  # both full
    placed.give_back(leases[1])
    assert placed.take(asynchronous=True).host is b  # type: ignore[union-attr]


async def test_a_sync_firing_gets_only_an_empty_worker_and_keeps_it_alone() -> None:
    placed = placement(2, concurrency=10)
    a, b = placed.hosts
    shared = placed.take(asynchronous=True)
    sync = placed.take(asynchronous=False)

    assert shared is not None and sync is not None and (shared.host, sync.host) == (a, b)
    assert placed.take(asynchronous=False) is None  # a holds an async firing, b a sync one
    assert all(placed.take(asynchronous=True).host is a for _ in range(5))  # type: ignore[union-attr]


async def test_a_waiting_sync_firing_drains_a_worker_that_async_work_keeps_busy() -> None:
    placed = placement(2, concurrency=10)
    a, b = placed.hosts
    first, on_b, second = (placed.take(asynchronous=True) for _ in range(3))
    assert on_b is not None and on_b.host is b and first and second and second.host is a

    waiting = asyncio.ensure_future(placed.wait(asynchronous=False))
    await asyncio.sleep(0)
    more = [placed.take(asynchronous=True) for _ in range(3)]  # b, the least loaded, is kept for it
    placed.give_back(on_b)
    lease = await asyncio.wait_for(waiting, 5)

    assert all(m is not None and m.host is a for m in more)
    assert lease is not None and lease.host is b and lease.exclusive


async def test_a_waiting_firing_is_woken_to_start_a_worker_when_room_frees() -> None:
    placed = placement(1, concurrency=1, size=1)
    [a] = placed.hosts
    held = placed.take(asynchronous=True)
    waiting = asyncio.ensure_future(placed.wait(asynchronous=True))
    await asyncio.sleep(0)

    placed.remove(a)  # it died: a new one may be started in its place

    assert await waiting is None and placed.reserve_start()
    placed.give_back(held)  # type: ignore[arg-type]


async def test_five_hundred_async_firings_run_at_once_on_two_workers(make_pool: MakePool) -> None:
    n = 500
    pool = await make_pool(2, concurrency=300)
    asked = 0
    all_in = asyncio.Event()

    async def gather(kind: str, payload: Any, timeout: float | None) -> bool:
        # The barrier: no firing gets its answer before every one of them has napped and asked.
        nonlocal asked
        asked += 1
        if asked == n:
            all_in.set()
        await all_in.wait()
        return True

    firings = [run(pool, "nap", n=i, seconds=0.5, gather=True, on_call=gather) for i in range(n)]
    try:
        async with asyncio.timeout(60):
            spans = [span(o) for o in await asyncio.gather(*firings)]
    except TimeoutError:
        pytest.fail(f"only {asked} of {n} firings were ever running at once")

    assert pool.started == 2
    peaks: dict[int, int] = defaultdict(int)
    for s in spans:
        peaks[s["pid"]] = max(peaks[s["pid"]], s["peak"])
    assert len(peaks) == 2 and sum(peaks.values()) == n, peaks  # both processes, every firing at once


async def test_an_async_timeout_cancels_only_that_firing(make_pool: MakePool) -> None:
    pool = await make_pool(1, concurrency=10)
    arrivals = Arrivals()
    neighbours = [run(pool, "nap", n=i, seconds=1.0, on_event=arrivals.on_event) for i in range(4)]
    await arrivals.wait(4)

    with pytest.raises(TransitionTimeout) as timed_out:
        await run(pool, "nap", n=99, seconds=60, timeout=0.3)
    spans = [span(o) for o in await asyncio.gather(*neighbours)]
    after = span(await run(pool, "sync_nap", n=100))  # the worker is whole: a sync firing gets it alone

    assert "was cancelled" in timed_out.value.message and "killed" not in timed_out.value.message
    assert {s["pid"] for s in spans} == {after["pid"]} == set(arrivals.pids)
    assert pool.started == 1


async def test_an_async_firing_that_blocks_the_loop_past_its_timeout_takes_its_worker_down(
    make_pool: MakePool
) -> None:
    pool = await make_pool(1, concurrency=10, cancel_grace=0.5)
    arrivals = Arrivals()
    neighbours = [run(pool, "nap", n=i, seconds=60, on_event=arrivals.on_event) for i in range(3)]
    await arrivals.wait(3)

    with pytest.raises(TransitionTimeout) as timed_out:
        await run(pool, "block", seconds=60, timeout=0.3)
    crashed = await asyncio.gather(*neighbours, return_exceptions=True)
    after = span(await run(pool, "nap", n=100))

    assert "blocks the event loop" in timed_out.value.message
    assert f"pid {arrivals.pids[0]}) was killed, and with it 3 other firing(s)" in timed_out.value.message
    for exc in crashed:
        assert isinstance(exc, SandboxCrashed) and exc.retryable, exc
        assert "'block'" in exc.message and "blocks the event loop" in exc.message
        assert "not at fault" in exc.message and "killed by signal 9" in exc.message
    assert after["pid"] != arrivals.pids[0] and pool.started == 2


async def test_a_sync_firing_never_shares_its_worker(make_pool: MakePool) -> None:
    pool = await make_pool(2, concurrency=50)
    kinds = ["sync_nap" if i % 7 == 3 else "nap" for i in range(60)]
    firings = [run(pool, kind, n=i, seconds=0.2) for i, kind in enumerate(kinds)]
    spans = [span(o) for o in await asyncio.gather(*firings)]

    sync = [s for s in spans if s["how"] == "sync"]
    assert len(sync) == kinds.count("sync_nap")
    for s in sync:
        assert s["running_at_start"] == s["running_at_end"] == 1, s
        sharing = [o for o in spans if o is not s and o["pid"] == s["pid"]
                   and o["start"] < s["end"] and s["start"] < o["end"]]
        assert not sharing, (s, sharing)
    assert max(s["peak"] for s in spans if s["how"] == "async") > 1  # async ones did share


async def test_awaited_context_calls_of_concurrent_firings_get_their_own_answers(
    make_pool: MakePool
) -> None:
    pool = await make_pool(1, concurrency=100)
    said: dict[int, list[tuple[str, Any]]] = defaultdict(list)

    def answers_for(n: int) -> Callable[[str, Any, float | None], Awaitable[Any]]:
        async def on_call(kind: str, payload: Any, timeout: float | None) -> Any:
            # Answer by what was asked, late and out of order, so replies cross on the pipe.
            await asyncio.sleep(random.random() * 0.05)
            asked = int(payload["description" if kind == "confirm" else "text"].split()[1])
            return asked % 2 == 0 if kind == "confirm" else f"reply to {asked}"
        return on_call

    firings = [run(pool, "ask", n=i, blocking=i % 10 == 0, on_call=answers_for(i),
                   on_event=lambda kind, payload, i=i: said[i].append((kind, payload)))
               for i in range(60)]
    spans = [span(o) for o in await asyncio.gather(*firings)]

    assert [s["answer"] for s in spans] == [f"{i % 2 == 0}/reply to {i}" for i in range(60)]
    assert all(said[i] == [("say", f"hello {i}"), ("remember", {"n": i})] for i in range(60))
    assert max(s["peak"] for s in spans) > 1


async def test_a_def_run_and_its_threads_asking_at_once_each_get_their_own_answers(make_pool: MakePool) -> None:
    """While a def run has the worker, nobody reads its pipe but a thread waiting for a reply: here the
    run and four threads it started all wait at once, answered late and out of order; whichever reads
    hands the others their replies. Then the worker goes on to the next run as usual."""
    pool = await make_pool(1, concurrency=1)

    async def on_call(kind: str, payload: Any, timeout: float | None) -> Any:
        await asyncio.sleep(random.random() * 0.05)
        asked = payload["description" if kind == "confirm" else "text"].split()[1]
        return asked.endswith(("0", "2", "4")) if kind == "confirm" else f"reply to {asked}"

    spans = []
    for n in range(3):
        spans.append(span(await run(pool, "sync_ask", n=n, threads=4, on_call=on_call)))
        spans.append(span(await run(pool, "sync_nap", n=n)))

    for n in range(3):
        assert spans[2 * n]["answer"] == " ".join(f"{k % 2 == 0}/reply to {n}.{k}" for k in range(5))
        assert spans[2 * n]["how"] == "sync" and spans[2 * n]["peak"] == 1
    assert len({s["pid"] for s in spans}) == 1  # one worker: it read on between and after the runs


async def test_a_worker_killed_with_sigkill_fails_every_firing_it_held(make_pool: MakePool) -> None:
    pool = await make_pool(1, concurrency=20)
    arrivals = Arrivals()
    firings = [run(pool, "nap", n=i, seconds=60, on_event=arrivals.on_event) for i in range(5)]
    await arrivals.wait(5)
    [pid] = set(arrivals.pids)

    os.kill(pid, signal.SIGKILL)
    crashed = await asyncio.gather(*firings, return_exceptions=True)
    after = span(await run(pool, "nap", n=5))

    for exc in crashed:
        assert isinstance(exc, SandboxCrashed) and exc.retryable, exc
        assert f"(pid {pid}) died (killed by signal 9)" in exc.message
    assert after["pid"] != pid and pool.started == 2


async def test_an_abandoned_async_firing_is_cancelled_in_its_worker_not_killed(make_pool: MakePool) -> None:
    pool = await make_pool(1, concurrency=10)
    arrivals = Arrivals()
    neighbours = [run(pool, "nap", n=i, seconds=1.0, on_event=arrivals.on_event) for i in range(3)]
    abandoned = run(pool, "nap", n=99, seconds=60, on_event=arrivals.on_event)
    await arrivals.wait(4)

    abandoned.cancel()
    spans = [span(o) for o in await asyncio.gather(*neighbours)]
    # A sync firing needs the worker empty: it runs only once the cancelled run has confirmed.
    after = span(await run(pool, "sync_nap", n=100))

    assert abandoned.cancelled()
    assert {s["pid"] for s in spans} == {after["pid"]} and pool.started == 1


class StartNotReported(Exception):
    pass


async def test_a_run_is_handed_to_its_worker_before_its_start_is_reported(make_pool: MakePool) -> None:
    """``handed`` (the executor's start event) runs once the worker has the run: here it waits until the
    run itself says it is in, which never happens if the run is only handed over after it. If it raises,
    the run is abandoned: an async one cancelled in its worker, a def one's worker killed."""
    pool = await make_pool(1, concurrency=10)
    arrivals = Arrivals()
    reported: list[int] = []

    async def report_once_in() -> None:
        await arrivals.wait(1)
        reported.append(arrivals.pids[0])

    ok = await pool.run(request("nap", n=1), on_event=arrivals.on_event, on_call=no_calls, timeout=None,
                        asynchronous=True, handed=report_once_in)
    assert span(ok)["pid"] == reported[0]

    async def refuse_once_in() -> None:
        await arrivals.wait(2)
        raise StartNotReported("the bus is gone")

    with pytest.raises(StartNotReported):
        await pool.run(request("nap", n=2, seconds=60), on_event=arrivals.on_event, on_call=no_calls,
                       timeout=None, asynchronous=True, handed=refuse_once_in)
    after = span(await run(pool, "sync_nap", n=3))  # needs the worker empty: the abandoned run was cancelled
    assert after["pid"] == reported[0] and pool.started == 1

    asked = asyncio.Event()

    async def never_answered(kind: str, payload: Any, timeout: float | None) -> Any:
        asked.set()
        await asyncio.sleep(3600)

    async def refuse_once_asked() -> None:
        await asyncio.wait_for(asked.wait(), 30)
        raise StartNotReported("the bus is gone")

    with pytest.raises(StartNotReported):
        await pool.run(request("sync_ask", n=4, threads=0), on_event=lambda kind, payload: None,
                       on_call=never_answered, timeout=None, handed=refuse_once_asked)
    last = span(await run(pool, "sync_nap", n=5))
    assert last["pid"] != reported[0] and pool.started == 2  # the def run's worker was killed


def test_a_run_cancelled_before_it_began_still_reports_done() -> None:
    # The worker's side alone, in this process, with the cancel landing before the run's first step.
    ours, theirs = multiprocessing.Pipe()
    net = load_bot(CONCURRENCY).net()
    runner = Runner(Pipe(theirs), {net.bot: net})
    threading.Thread(target=runner.serve, daemon=True).start()
    frames = p.Frames()

    def receive() -> tuple[Any, ...]:
        while not (msgs := frames.feed(os.read(ours.fileno(), 1 << 16) if ours.poll(10) else b"")):
            assert ours.poll(0), "the worker said nothing for 10s"
        [msg] = msgs
        return msg

    assert receive()[0] == p.READY
    run = (7, request("nap", n=1, seconds=60))
    runner.loop.call_soon_threadsafe(lambda: (runner._start([run]), runner._cancel(7)))
    kind, job, outcome = receive()
    p.write(ours.fileno(), p.frame((p.STOP,)))

    assert (kind, job) == (p.DONE, 7)
    assert not outcome.ok and outcome.error_type == p.CANCELLED and outcome.retryable


def test_a_container_style_worker_ends_mid_run_when_its_socket_closes(tmp_path: Path) -> None:
    """A worker with no parent process to watch (a container's: ``exit_on_eof``) exits when the other end
    of its socket closes, though a def run holds its main thread and nothing reads the socket then: its
    lifeline polls for the hang-up alone. A process worker's lifeline is its parent process instead."""
    from petribus_executor import worker

    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=worker.main, args=(theirs, [CONCURRENCY], {"exit_on_eof": True}), daemon=True)
    child.start()
    theirs.close()
    frames = p.Frames()

    def receive(within: float) -> tuple[Any, ...]:
        while not (msgs := frames.feed(os.read(ours.fileno(), 1 << 16) if ours.poll(within) else b"")):
            raise AssertionError(f"the worker said nothing for {within}s")
        return msgs[0]

    try:
        assert receive(60)[0] == p.READY
        begun = tmp_path / "begun"
        p.write(ours.fileno(), p.frame((p.RUN, 1, request("sync_nap", n=1, seconds=60, begun=str(begun)))))
        deadline = time.monotonic() + 60
        while not begun.exists():  # the run has begun: the main thread sleeps in it, nobody reads the socket
            assert time.monotonic() < deadline, "the def run never began"
            time.sleep(0.02)
        assert child.is_alive() and not ours.poll(0)  # and it said nothing yet
        ours.close()
        child.join(10)
        assert child.exitcode == 70, child.exitcode  # gone within seconds, not after its 60 s run
    finally:
        if child.is_alive():
            child.kill()


async def test_a_fan_out_runs_all_at_once_through_the_stack_with_default_credits(
    settings: Settings, nc: Any, tmp_path: Path
) -> None:
    n = 300
    release = tmp_path / "release"
    async with Stack(settings, [CONCURRENCY], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "concurrency") as log:
        await log.add_many("Nap", [{"n": i, "release": str(release)} for i in range(n)])
        # Every firing says it is in, then waits for the file: all n are in only if all n run at once.
        await log.until("agent_message", count=n, timeout=60)
        release.touch()
        await log.until("transition_completed", count=n, timeout=60)
        started = stack.services["executor"].workers.started

    spans = marking(await log.state())["Span"]
    assert sorted(s["n"] for s in spans) == list(range(n))
    assert len({s["pid"] for s in spans}) <= started <= settings.workers
