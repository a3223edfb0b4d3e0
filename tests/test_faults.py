"""Processes killed with SIGKILL mid-work, then restarted: nothing lost, nothing done twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

from nats.js.api import AckPolicy, ConsumerConfig

from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import Marker, MarkerAdded, TransitionFired, decode
from petribus.work import WorkItem

from .conftest import app

COUNTER = app("counter")


def _scheduler(url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "petribus_cli", "scheduler", COUNTER, "--nats-url", url, "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PETRIBUS_ACK_WAIT_S": "30"},
    )


async def test_scheduler_killed_mid_stream_loses_and_doubles_nothing(settings, nc):
    log = EventLog(nc)
    js = nc.jetstream()
    sessions = [f"k{i}" for i in range(20)]
    markers = [MarkerAdded(bot="counter", session_id=sessions[i % 20], marker=Marker(location="Item", data={"n": i}))
               for i in range(600)]
    fired = await js.subscribe(subjects.bot_events("counter"), ordered_consumer=True)
    await js.add_consumer(subjects.WORK_STREAM, ConsumerConfig(
        durable_name="audit", filter_subject=subjects.work("cpu"), ack_policy=AckPolicy.EXPLICIT))
    audit = await js.pull_subscribe_bind("audit", stream=subjects.WORK_STREAM)
    work: Counter[str] = Counter()
    procs = [_scheduler(settings.nats_url)]
    try:
        await log.append_many(markers[:300])
        # Kill it while it is busy: after it has claimed some, well before it could have claimed all.
        claims = 0
        while claims < 50:
            claims += decode((await fired.next_msg(timeout=30)).data).type == "transition_fired"
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        await log.append_many(markers[300:])  # arrive while no scheduler runs
        procs.append(_scheduler(settings.nats_url))
        while claims < 600:
            claims += decode((await fired.next_msg(timeout=60)).data).type == "transition_fired"
        # Every claim gets its work item from the living scheduler, including claims whose dispatch
        # the kill interrupted (re-dispatched on restart).
        while sum(work.values()) < 600:
            for msg in await audit.fetch(100, timeout=30):
                work[WorkItem.model_validate_json(msg.data).firing_id] += 1
                await msg.ack()
    finally:
        await fired.unsubscribe()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    consumed: Counter[str] = Counter()
    firings: set[str] = set()
    for sid in sessions:
        events = await log.read("counter", sid)
        assert fold(events).counts().get("Item", 0) == 0
        for _, ev in events:
            if isinstance(ev, TransitionFired):
                consumed.update(ev.consumed)
                firings.add(ev.firing_id)
    assert set(consumed) == {m.marker.id for m in markers} and max(consumed.values()) == 1

    assert set(work) == firings and max(work.values()) == 1
