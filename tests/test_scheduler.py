"""The scheduler against a real nats-server: claims, conflicts between schedulers, re-dispatch."""

from __future__ import annotations

import asyncio
from collections import Counter

from nats.js.api import AckPolicy, ConsumerConfig

from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import Marker, MarkerAdded, TransitionFired, decode
from petribus.loader import load_net
from petribus.work import WorkItem
from petribus_scheduler.app import Scheduler

from .conftest import app

COUNTER = app("counter")


async def _wait_for_fired(nc, bot: str, expected: int, timeout: float = 60.0) -> None:
    """Until ``expected`` transition_fired of ``bot`` are in the log (an ordered consumer: nothing missed)."""
    sub = await nc.jetstream().subscribe(subjects.bot_events(bot), ordered_consumer=True)
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            while seen < expected:
                msg = await sub.next_msg(timeout=timeout)
                seen += decode(msg.data).type == "transition_fired"
    finally:
        await sub.unsubscribe()


async def test_two_schedulers_consume_every_marker_exactly_once(settings, nc):
    net = load_net(COUNTER)
    log = EventLog(nc)
    sessions = [f"s{i}" for i in range(10)]
    markers = [
        MarkerAdded(bot="counter", session_id=sessions[i % len(sessions)],
                    marker=Marker(location="Item", data={"n": i}))
        for i in range(1000)
    ]
    async with Scheduler(settings, [net], instance="a") as a, Scheduler(settings, [net], instance="b") as b:
        # Publish while both schedulers are running, so they race for the same sessions.
        for start in range(0, len(markers), 100):
            await log.append_many(markers[start:start + 100])
        await _wait_for_fired(nc, "counter", expected=1000)
        stats = (a.stats, b.stats)

    consumed: Counter[str] = Counter()
    firing_ids: Counter[str] = Counter()
    for sid in sessions:
        state = fold(await log.read("counter", sid))
        assert state.counts().get("Item", 0) == 0, f"{sid} still holds unconsumed items"
        for _, ev in await log.read("counter", sid):
            if isinstance(ev, TransitionFired):
                consumed.update(ev.consumed)
                firing_ids[ev.id] += 1
    assert set(consumed) == {m.marker.id for m in markers}
    assert max(consumed.values()) == 1, "a marker was claimed by two firings"
    assert all(n == 1 for n in firing_ids.values())
    # Both schedulers did real work (the consumer is shared), and together they fired exactly 1,000.
    assert stats[0]["fired"] + stats[1]["fired"] == 1000
    assert stats[0]["fired"] > 0 and stats[1]["fired"] > 0


async def test_stale_scheduler_refolds_on_conflict_instead_of_double_consuming(settings, nc):
    """A scheduler deciding from a stale fold is refused by the expected-sequence guard, re-folds, and claims nothing twice."""
    log = EventLog(nc)
    left = MarkerAdded(bot="counter", session_id="x", marker=Marker(location="Left", data={"v": 1}))
    right = MarkerAdded(bot="counter", session_id="x", marker=Marker(location="Right", data={"v": 2}))
    await log.append(left)
    await log.append(right)
    stale = fold(await log.read("counter", "x"))  # what this scheduler believes: Left and Right are free
    # Meanwhile another scheduler claimed both for a join.
    rival = TransitionFired(bot="counter", session_id="x", firing_id="rival", transition="join",
                            consumed=[left.marker.id, right.marker.id])
    await log.append(rival, expected_last_seq=stale.last_seq)

    sched = Scheduler(settings, [load_net(COUNTER)])
    sched.js = nc.jetstream()
    sched.events = log
    await sched._advance(("counter", "x"), stale)

    assert sched.stats["conflicts"] == 1
    assert sched.stats["fired"] == 0
    fired = [e for _, e in await log.read("counter", "x") if isinstance(e, TransitionFired)]
    assert [f.firing_id for f in fired] == ["rival"]
    assert stale.counts() == {} and set(stale.in_flight) == {"rival"}  # re-folded to the truth


async def test_claimed_but_undispatched_firing_is_dispatched_on_start(settings, nc):
    """A scheduler that died between claiming and dispatching leaves a transition_fired with no work: the next one sends it."""
    log = EventLog(nc)
    item = MarkerAdded(bot="counter", session_id="crash", marker=Marker(location="Item", data={"n": 7}))
    item_seq = await log.append(item)
    # What a dying scheduler left behind: the claim is in the log, the work command never went out.
    await log.append(TransitionFired(bot="counter", session_id="crash", firing_id="f-orphan",
                                     transition="work", consumed=[item.marker.id]),
                     expected_last_seq=item_seq)
    js = nc.jetstream()
    await js.add_consumer(subjects.WORK_STREAM, ConsumerConfig(
        durable_name="probe", filter_subject=subjects.work("cpu"), ack_policy=AckPolicy.EXPLICIT))
    probe = await js.pull_subscribe_bind("probe", stream=subjects.WORK_STREAM)
    async with Scheduler(settings, [load_net(COUNTER)]):
        [msg] = await probe.fetch(1, timeout=20)
    work = WorkItem.model_validate_json(msg.data)
    assert work.firing_id == "f-orphan"
    assert [m.id for m in work.inputs] == [item.marker.id]
    assert work.inputs[0].data == {"n": 7}


async def test_guard_sees_typed_markers_and_skips_refused_ones(settings, nc):
    """``when=`` gets the inputs as models; refused (or raising) candidates stay, younger ones still fire."""
    net = load_net(f"{COUNTER.rsplit(':', 1)[0]}:guarded")
    log = EventLog(nc)
    orders = [MarkerAdded(bot="guarded", session_id="g", marker=Marker(location="Order", data={"amount": a}))
              for a in (500, 13, 40)]  # refused by the guard, makes the guard raise, accepted
    async with Scheduler(settings, [net]):
        await log.append_many(orders)
        await _wait_for_fired(nc, "guarded", expected=1)
    fired = [e for _, e in await log.read("guarded", "g") if isinstance(e, TransitionFired)]
    assert [f.consumed for f in fired] == [[orders[2].marker.id]]
    state = fold(await log.read("guarded", "g"))
    assert [m.data["amount"] for m in state.marking()["Order"]] == [500, 13]
