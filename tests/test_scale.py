"""The headline: one query fans out to 1,000 firings that run at once, and one join takes all 1,000."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import Marker, MarkerAdded, TransitionCompleted, TransitionFired
from petribus.settings import Settings

from .conftest import app
from .harness import Stack
from .test_executor import SessionLog

FANOUT = app("fanout")


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """``petribus <service> fanout`` as a child process, ready when it says it started."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(name: str, *args: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "petribus_cli", name, FANOUT, "--nats-url", settings.nats_url, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PETRIBUS_LOG_LEVEL": "info"}, start_new_session=True,
        )
        procs.append(proc)
        assert proc.stderr is not None
        async with asyncio.timeout(60):
            while b"started" not in (line := await proc.stderr.readline()):
                assert line, f"petribus {name} exited before it started"
        asyncio.create_task(proc.stderr.read())  # keep draining its log so it never blocks on a full pipe
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def test_a_fan_out_of_1000_runs_at_once_and_a_join_of_1000_takes_them_all(
    settings: Settings, nc: Any, service: Callable[..., Any]
) -> None:
    # Default settings: what `petribus serve` gives a new user, no flags.
    await service("scheduler")
    await service("executor")
    async with SessionLog(nc, "fanout") as log:
        await log.add("Query", n=1000, wait=5.0)
        [joined] = await log.until("transition_completed", transition="join", timeout=240)

    events = [e for _, e in await EventLog(nc).read("fanout", log.session_id)]
    fired = {e.firing_id: e for e in events if isinstance(e, TransitionFired)}
    completed = [e for e in events if isinstance(e, TransitionCompleted)]
    by_transition = Counter(fired[c.firing_id].transition for c in completed)
    assert by_transition == {"spread": 1, "work": 1000, "join": 1}

    # Every marker is consumed exactly once, and the join consumed exactly the 1,000 results.
    consumed = Counter(mid for f in fired.values() for mid in f.consumed)
    assert set(consumed.values()) == {1}
    tasks = {m.id for c in completed if fired[c.firing_id].transition == "spread" for m in c.outputs}
    results = {m.id for c in completed if fired[c.firing_id].transition == "work" for m in c.outputs}
    assert len(tasks) == 1000 and len(results) == 1000
    assert set(fired[joined.firing_id].consumed) == results
    assert {mid for f in fired.values() if f.transition == "work" for mid in f.consumed} == tasks
    assert joined.outputs[0].data == {"count": 1000, "total": sum(range(1000))}

    # They ran at once: the log shows how many work firings had started and not yet completed.
    running = peak = 0
    for e in events:
        if e.type in ("transition_started", "transition_completed") and fired[e.firing_id].transition == "work":
            running += 1 if e.type == "transition_started" else -1
            peak = max(peak, running)
    assert peak >= 900, peak  # each waits 5 s: all but the slowest to start overlap

    state = fold(await EventLog(nc).read("fanout", log.session_id))
    assert {loc: len(ms) for loc, ms in state.marking().items()} == {"Summary": 1}
    assert not state.in_flight


async def test_a_join_of_10000_markers_is_claimed_in_one_firing_and_runs(settings: Settings, nc: Any) -> None:
    big = FANOUT.replace(":bot", ":big")
    async with Stack(settings, [big], parts=("scheduler", "executor")), SessionLog(nc, "bigjoin") as log:
        parts = [Marker(location="Part", data={"i": i}) for i in range(10_001)]
        await EventLog(nc).append_many(MarkerAdded(bot="bigjoin", session_id=log.session_id, marker=m)
                                       for m in parts)
        [joined] = await log.until("transition_completed", timeout=120)

    [claim] = log.of("transition_fired")
    assert claim.consumed == [m.id for m in parts[:10_000]]  # the oldest 10,000, in order
    assert joined.outputs[0].data == {"count": 10_000, "total": sum(range(10_000))}
    state = await log.state()
    assert [m.id for m in state.marking()["Part"]] == [parts[-1].id] and not state.in_flight
