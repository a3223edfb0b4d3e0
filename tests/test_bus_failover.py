"""Bus fail-over on a real 3-node cluster (R3 streams): the stream's leader is killed (-9) and the log
and its consumers carry on through the election, with nothing doubled and no process restarted."""

from __future__ import annotations

import asyncio

from petribus import bus, subjects
from petribus.bus import EventLog
from petribus.consumer import PullConsumer
from petribus.events import Marker, MarkerAdded

from .cluster import (  # noqa: F401 - the fixtures register by name
    cluster_fixture,
    cluster_nc_fixture,
    cluster_settings_fixture,
    kill,
    wait_for_leader,
)

BOUND_S = 90  # only so that a broken test fails instead of hanging; nothing is timed


def _marker(i: int) -> MarkerAdded:
    return MarkerAdded(bot="b", session_id="s", marker=Marker(location="X", data={"i": i}))


async def consumer_leader(js, durable: str) -> str | None:
    try:
        info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    except Exception:  # noqa: BLE001 - mid-election: no responders, a timeout, "no leader"; the caller polls
        return None
    return info.cluster.leader if info.cluster else None


async def test_appends_through_a_stream_leader_fail_over_land_once_in_order(cluster, cluster_nc) -> None:
    log = EventLog(cluster_nc, outage_s=60)
    seq = await log.append(_marker(0))
    leader = await wait_for_leader(cluster_nc)

    kill(cluster, leader)
    events = [_marker(i) for i in range(1, 6)]
    for event in events:  # each one at the expected sequence, as the scheduler claims
        seq = await asyncio.wait_for(log.append(event, expected_last_seq=seq, timeout=2.0), BOUND_S)

    assert await wait_for_leader(cluster_nc, other_than=leader) != leader  # the fault happened: a new leader
    read = await log.read("b", "s", at_least=seq)
    assert [e.id for _, e in read][1:] == [e.id for e in events]  # once each, in order
    assert read[-1][0] == seq


async def test_a_pull_consumer_keeps_delivering_after_its_leader_is_killed(cluster, cluster_nc) -> None:
    js = cluster_nc.jetstream()
    await bus.ensure_event_consumer(js, "failover-test", ack_wait_s=30)
    log = EventLog(cluster_nc, outage_s=60)
    consumer = PullConsumer(cluster_nc, subjects.EVENTS_STREAM, "failover-test", max_inflight=8)
    await consumer.start()
    try:
        await log.append(_marker(0))
        [msg] = await asyncio.wait_for(consumer.next_batch(8), BOUND_S)
        await msg.ack()
        consumer.release()
        async with asyncio.timeout(BOUND_S):
            while (leader := await consumer_leader(js, "failover-test")) is None:
                await asyncio.sleep(0.1)

        kill(cluster, leader)
        after = _marker(1)
        await log.append(after)

        got = []
        async with asyncio.timeout(BOUND_S):
            while not any(after.id.encode() in m.data for m in got):
                got += await consumer.next_batch(8)
        new_leader = await consumer_leader(js, "failover-test")
        assert new_leader is not None and new_leader != leader  # the fault happened: another node leads
        for m in got:
            await m.ack()
        consumer.release(len(got))
    finally:
        await consumer.stop()


async def test_a_pull_consumer_connected_elsewhere_keeps_delivering_when_its_leader_dies(cluster, cluster_nc) -> None:
    """The client's own server survives: no reconnect tells it anything; the consumer must notice alone."""
    js = cluster_nc.jetstream()
    await bus.ensure_event_consumer(js, "elsewhere-test", ack_wait_s=30)
    async with asyncio.timeout(BOUND_S):
        while (leader := await consumer_leader(js, "elsewhere-test")) is None:
            await asyncio.sleep(0.1)
    survivor = next(n for name, n in cluster.nodes.items() if name != leader)
    nc = await bus.connect(f"nats://{survivor.host}:{survivor.port}", name="elsewhere")  # that node only
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    bus.on_reconnect(nc, on_reconnect)
    log = EventLog(nc, outage_s=60)
    consumer = PullConsumer(nc, subjects.EVENTS_STREAM, "elsewhere-test", max_inflight=8)
    await consumer.start()
    try:
        await log.append(_marker(0))
        [msg] = await asyncio.wait_for(consumer.next_batch(8), BOUND_S)
        await msg.ack()
        consumer.release()

        kill(cluster, leader)
        after = _marker(1)
        await log.append(after)
        got = []
        async with asyncio.timeout(BOUND_S):
            while not any(after.id.encode() in m.data for m in got):
                got += await consumer.next_batch(8)

        assert not reconnected.is_set()  # its connection never dropped
        new_leader = await consumer_leader(js, "elsewhere-test")
        assert new_leader is not None and new_leader != leader
        for m in got:
            await m.ack()
        consumer.release(len(got))
    finally:
        await consumer.stop()
        await nc.close()


async def test_a_claim_stored_on_three_replicas_is_republished_with_its_sequence(cluster, cluster_nc) -> None:
    """Executors run work sent with its claim on the claim's republish: on a replicated PB_EVENTS too."""
    from .test_executor import check_claims_republished

    await check_claims_republished(cluster_nc, stored_within_s=10)
