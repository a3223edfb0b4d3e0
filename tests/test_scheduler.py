"""The scheduler against a real nats-server: claims (atomic batches), conflicts between schedulers,
re-dispatch, a failing session parked beside healthy ones, lost work sent again by the lease."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter

import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import (ErrorEvent, Marker, MarkerAdded, SessionCreated, TransitionCompleted, TransitionFired,
                             decode)
from petribus.loader import load_net
from petribus.work import WorkItem
from petribus_scheduler.app import CLAIM_BATCH, Scheduler
from petribus_scheduler.leases import Lease, Leases
from petribus_scheduler.timers import retry_delay

from .conftest import app
from .harness import Stack

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


async def test_markers_appended_while_claiming_do_not_refuse_claims_and_the_replay_stays_exact(settings, nc):
    """A claim is refused only by another claim: markers (and a firing's start and outputs) that land
    between a fold and its claim leave the plan valid, are folded with the claim, and are decided on next.
    One session, markers appended in bursts while its firings run: no claim is refused, some claims land
    past such events (what this tests), every marker is consumed once, and the log replays with 0
    differences though claims were decided on folds before the events just ahead of them."""
    from petribus.replay import replay

    net = load_net(COUNTER)
    log = EventLog(nc)
    markers = [MarkerAdded(bot="counter", session_id="busy", marker=Marker(location="Item", data={"n": i}))
               for i in range(600)]
    await log.append(SessionCreated(bot="counter", session_id="busy"))  # opened as the gateway opens one
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack:
        for start in range(0, len(markers), 20):
            await log.append_many(markers[start:start + 20])
        await _wait_for_fired(nc, "counter", expected=600)
        js = nc.jetstream()
        async with asyncio.timeout(60):  # every outcome in the log, and every event handled by the scheduler
            while Counter(e.type for _, e in await log.read("counter", "busy"))["transition_completed"] < 600:
                await asyncio.sleep(0.05)
            while (info := await js.consumer_info(subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE)) \
                    .num_ack_pending or info.num_pending:
                await asyncio.sleep(0.05)
        scheduler = stack.services["scheduler"]
        stats, cached = scheduler.stats, scheduler.sessions[("counter", "busy")]
    events = await log.read("counter", "busy")
    # The scheduler's fold, which took events in past its claims, is the log's.
    whole = fold(events)
    assert not scheduler.ahead and cached.last_seq == max(s for s, e in events if e.type != "transition_started")
    assert {loc: list(ms) for loc, ms in cached.places.items() if ms} == \
           {loc: list(ms) for loc, ms in whole.places.items() if ms}
    assert cached.finished == whole.finished and not cached.in_flight and not whole.in_flight
    consumed = Counter(mid for _, e in events if isinstance(e, TransitionFired) for mid in e.consumed)
    assert set(consumed) == {m.marker.id for m in markers} and max(consumed.values()) == 1
    assert stats["claimed_past"] > 0  # claims landed past others' events: the case under test happened
    assert stats["conflicts"] == 0  # ... and none of those events refused a claim
    assert stats["catchups"] == 0 and stats["rebuilds"] == 0  # ... they were folded as delivered, never read
    assert any(e.planned_at is not None and e.planned_at < s - 1 for s, e in events if isinstance(e, TransitionFired))
    report = replay(net, events)
    assert report.differences == [] and report.firings == 600


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
    sched.leases = Leases(nc, sched.log, sched.renew, period_s=60.0, ack_wait_s=30.0)
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


def test_retry_delay_doubles_per_delivery_up_to_its_cap():
    assert [retry_delay(d, first_s=1.0, max_s=60.0) for d in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000, first_s=1.0, max_s=60.0) == 60.0


async def test_a_failing_session_is_reported_once_and_parked_while_the_others_keep_flowing(
    settings, nc, monkeypatch
):
    first_retry_s = 0.05
    settings = settings.model_copy(update={"scheduler_retry_s": first_retry_s})
    attempts: list[tuple[int, int]] = []  # (stream seq, delivery) of every failed step of the bad session
    fourth_delivery = asyncio.Event()
    handle = Scheduler._handle

    async def fails_for_one_session(self, key, batch):
        if key[1] != "bad":
            return await handle(self, key, batch)
        for msg, _ in batch:
            attempts.append((msg.metadata.sequence.stream, msg.metadata.num_delivered))
            if msg.metadata.num_delivered >= 4:
                fourth_delivery.set()
        raise ZeroDivisionError("division by zero in a guard")

    monkeypatch.setattr(Scheduler, "_handle", fails_for_one_session)
    log = EventLog(nc)
    bad = MarkerAdded(bot="counter", session_id="bad", marker=Marker(location="Item", data={"n": -1}))
    healthy = [MarkerAdded(bot="counter", session_id=f"ok{i % 5}",
                           marker=Marker(location="Item", data={"n": i})) for i in range(200)]
    async with Scheduler(settings, [load_net(COUNTER)]) as sched:
        started = time.monotonic()
        await log.append(bad)
        await log.append_many(healthy)
        await _wait_for_fired(nc, "counter", expected=len(healthy))
        await asyncio.wait_for(fourth_delivery.wait(), 30)
        window_s, seen = time.monotonic() - started, list(attempts)
        failed = sched.stats["failed"]

    events = [e for _, e in await log.read("counter", "bad")]
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(errors) == 1, "one error event however often the session failed"
    assert errors[0].code == "scheduler_failed" and "bad" in errors[0].message
    assert "ZeroDivisionError" in errors[0].message and errors[0].cause == bad.id
    assert not any(isinstance(e, TransitionFired) for e in events)
    assert failed >= 4
    # Parked, not spinning: with pauses doubling from first_retry_s, n deliveries take at least
    # first_retry_s * (2**(n-1) - 1) seconds, so within the window each event came back only a few times.
    per_event = Counter(seq for seq, _ in seen)
    assert max(per_event.values()) <= 2 + math.log2(1 + window_s / first_retry_s)
    assert all(sorted(d for s, d in seen if s == seq) == list(range(1, n + 1))
               for seq, n in per_event.items())  # one failed step per delivery, nothing handled twice
    consumed: Counter[str] = Counter()
    for i in range(5):
        state = fold(await log.read("counter", f"ok{i}"))
        assert state.counts().get("Item", 0) == 0
        consumed.update(m.id for f in state.in_flight.values() for m in (p.marker for p in f.consumed))
    assert set(consumed) == {m.marker.id for m in healthy} and max(consumed.values()) == 1


async def test_a_few_firings_are_claimed_one_by_one_and_more_in_an_atomic_batch(settings, nc):
    """On a one-replica stream nats-server stages an atomic batch in a file store of its own (made, fsynced
    and removed per batch, several ms), so a decision of up to ``SEQUENTIAL_CLAIMS`` firings appends its
    claims one after another, each checked against the one before; a larger one is still one batch. Both
    consume every marker once and replay exactly."""
    from petribus.replay import replay

    from petribus_scheduler.app import SEQUENTIAL_CLAIMS

    log = EventLog(nc)
    few, many = SEQUENTIAL_CLAIMS - 3, SEQUENTIAL_CLAIMS + 12
    for sid, n in (("few", few), ("many", many)):
        await log.append(SessionCreated(bot="counter", session_id=sid))
        await log.append_many([MarkerAdded(bot="counter", session_id=sid,
                                           marker=Marker(location="Item", data={"n": i})) for i in range(n)])
    async with Scheduler(settings, [load_net(COUNTER)]) as sched:
        await _wait_for_fired(nc, "counter", expected=few + many)
        stats = dict(sched.stats)
    assert stats["fired"] == few + many and stats["conflicts"] == 0
    assert stats["atomic_batches"] == 1  # the larger decision; the smaller one's claims went one by one
    assert stats["claim_batches"] == few + 1
    for sid, n in (("few", few), ("many", many)):
        events = await log.read("counter", sid)
        fired = [e for _, e in events if isinstance(e, TransitionFired)]
        assert len(fired) == n and len({m for e in fired for m in e.consumed}) == n
        assert len({e.planned_at for e in fired}) == 1  # one decision each
        assert replay(load_net(COUNTER), events).differences == []


async def test_a_fan_out_of_1000_markers_is_claimed_in_one_atomic_batch_while_other_writers_append(
    settings, nc
):
    log = EventLog(nc)
    markers = [MarkerAdded(bot="counter", session_id="fan", marker=Marker(location="Item", data={"n": i}))
               for i in range(1000)]
    await log.append_many(markers)
    stop = asyncio.Event()
    noise_seqs: list[int] = []

    async def other_writer() -> None:  # another session's events land all along, one append at a time
        while not stop.is_set():
            noise_seqs.append(await log.append(
                MarkerAdded(bot="elsewhere", session_id="noise", marker=Marker(location="X", data={}))))

    writer = asyncio.create_task(other_writer())
    try:
        while not noise_seqs:
            await asyncio.sleep(0.01)
        async with Scheduler(settings, [load_net(COUNTER)]) as sched:
            await _wait_for_fired(nc, "counter", expected=1000)
            await log.append(MarkerAdded(bot="elsewhere", session_id="noise",
                                         marker=Marker(location="X", data={})))
            batches = sched.stats["claim_batches"]
    finally:
        stop.set()
        await writer

    fired = [(seq, e) for seq, e in await log.read("counter", "fan") if isinstance(e, TransitionFired)]
    seqs = [seq for seq, _ in fired]
    # The other writer appended before, during and after the claims, yet the claims lie in contiguous
    # runs of the stream, one per commit (one at a time, its appends would fall between them).
    assert noise_seqs[0] < seqs[0] and noise_seqs[-1] > seqs[-1] and len(noise_seqs) > 1
    runs = 1 + sum(b != a + 1 for a, b in itertools.pairwise(seqs))
    assert runs == batches == math.ceil(1000 / CLAIM_BATCH)
    consumed = Counter(mid for _, e in fired for mid in e.consumed)
    assert set(consumed) == {m.marker.id for m in markers} and max(consumed.values()) == 1


async def test_a_lost_work_item_is_sent_again_by_whichever_scheduler_runs_and_its_firing_completes(
    settings, nc
):
    settings = settings.model_copy(update={"work_lease_s": 0.5})
    log = EventLog(nc)
    js = nc.jetstream()
    item = MarkerAdded(bot="counter", session_id="lost", marker=Marker(location="Item", data={"n": 7}))
    async with Scheduler(settings, [load_net(COUNTER)]):
        await log.append(item)
        await _wait_for_fired(nc, "counter", expected=1)
    # That scheduler is gone, its claim dispatched and acked. Now the work item is lost.
    [fired] = [e for _, e in await log.read("counter", "lost") if isinstance(e, TransitionFired)]
    subject = subjects.work_item("cpu", "counter", "lost", fired.firing_id)
    assert WorkItem.model_validate_json((await js.get_last_msg(subjects.WORK_STREAM, subject)).data)
    await js.purge_stream(subjects.WORK_STREAM, subject=subject)
    with pytest.raises(NotFoundError):
        await js.get_last_msg(subjects.WORK_STREAM, subject)

    # No new event in the session: only the lease can notice. A fresh scheduler (nothing cached) does.
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack:
        done = await log.wait_for("counter", "lost", after=0, timeout=60,
                                  match=lambda e: e.type == "transition_completed")
        redispatched = stack.services["scheduler"].stats["redispatched"]
        # With nothing in flight any more, the session's lease is dropped.
        async with asyncio.timeout(30):
            while (await js.stream_info(subjects.TIMERS_STREAM,
                                        subjects_filter=subjects.leases())).state.messages:
                await asyncio.sleep(0.05)

    assert done is not None and done[1].firing_id == fired.firing_id
    assert redispatched == 1
    events = [e for _, e in await log.read("counter", "lost")]
    assert [e.type for e in events].count("transition_started") == 1
    assert fold(await log.read("counter", "lost")).marking()["Done"][0].data == {"n": 7}


async def test_the_lease_moves_to_the_oldest_firing_in_flight_and_resends_only_lost_work(settings, nc):
    settings = settings.model_copy(update={"work_lease_s": 0.3})
    log = EventLog(nc)
    js = nc.jetstream()
    sid = "moving"
    # Sees every work item sent for the session, and never acks one (that would remove it).
    work = await js.pull_subscribe(f"{subjects.WORK_PREFIX}.cpu.counter.{sid}.*", durable="probe",
                                   stream=subjects.WORK_STREAM)

    async def next_item() -> WorkItem:
        [msg] = await work.fetch(1, timeout=20)
        return WorkItem.model_validate_json(msg.data)

    try:
        async with Scheduler(settings, [load_net(COUNTER)]) as sched:
            await log.append_many([MarkerAdded(bot="counter", session_id=sid,
                                               marker=Marker(location="Item", data={"n": i}))
                                   for i in (1, 2)])
            sent = [await next_item() for _ in (1, 2)]
            first, second = sorted(sent, key=lambda w: w.fired_seq)
            # The first firing completes (its executor acked the item); the second one's item is lost.
            for w in (first, second):
                await js.purge_stream(subjects.WORK_STREAM, subject=w.subject("cpu"))
            await log.append(TransitionCompleted(bot="counter", session_id=sid, firing_id=first.firing_id,
                                                 transition="work"))
            again = await next_item()
            async with asyncio.timeout(20):
                while True:  # the lease moves (a new message, the old one acked) right after the check
                    leases = await js.stream_info(subjects.TIMERS_STREAM,
                                                  subjects_filter=subjects.lease("counter", sid))
                    last = await js.get_last_msg(subjects.TIMERS_STREAM, subjects.lease("counter", sid))
                    lease = Lease.model_validate_json(last.data)
                    if leases.state.messages == 1 and lease.firing_id != first.firing_id:
                        break
                    await asyncio.sleep(0.05)
            redispatched = sched.stats["redispatched"]
    finally:
        await work.unsubscribe()

    assert again.firing_id == second.firing_id and redispatched == 1
    assert lease.firing_id == second.firing_id  # one lease for the session, keyed by its oldest in flight


async def test_starts_are_acked_on_arrival_and_a_durable_filtered_by_kind_is_widened_in_place(settings, nc):
    """``transition_started`` decides nothing: the scheduler acks it as it arrives and never queues or folds
    it. Its consumer takes every event through one filter: a durable made by the previous version, filtered
    on every other kind (which cost nats-server a walk of a block's subjects per message), keeps its
    position and is widened in place."""
    from nats.js.api import DeliverPolicy

    from petribus.events import EVENT_TYPES

    js = nc.jetstream()
    await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(  # as the previous version made it
        durable_name=subjects.SCHEDULER_DURABLE,
        filter_subjects=subjects.kinds(*(k for k in EVENT_TYPES if k != "transition_started")),
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_ack_pending=20_000,
        max_deliver=-1))
    log = EventLog(nc)
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack:
        for i in range(3):
            await log.append(MarkerAdded(bot="counter", session_id="starts",
                                         marker=Marker(location="Item", data={"n": i})))
        async with asyncio.timeout(60):
            while Counter(e.type for _, e in await log.read("counter", "starts"))["transition_completed"] < 3:
                await asyncio.sleep(0.05)
            while (info := await js.consumer_info(subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE)) \
                    .num_ack_pending or info.num_pending:
                await asyncio.sleep(0.05)
        stats = stack.services["scheduler"].stats
    kinds = Counter(e.type for _, e in await log.read("counter", "starts"))
    assert kinds["transition_started"] == 3  # the executor appended its starts ...
    assert info.config.filter_subject == subjects.all_events() and not info.config.filter_subjects
    assert info.delivered.consumer_seq == sum(kinds.values())  # ... delivered with everything else ...
    assert stats["starts_acked"] == 3  # ... and acked on arrival
