"""Bus outages against a real nats-server that is killed (-9) and restarted on the same port and store:
appends ride the outage out and land once, conflicts are recognised by every code, reads that decide see
what they were told exists, and pull consumers come back by themselves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.js.errors import APIError
from petribus import bus, subjects
from petribus.bus import BusUnavailable, EventLog, Publisher, WrongLastSequence, is_wrong_last_sequence
from petribus.consumer import PullConsumer
from petribus.embedded import NatsServer
from petribus.errors import BusTimeout
from petribus.events import Marker, MarkerAdded

BOUND_S = 60  # only so that a broken test fails instead of hanging; nothing is timed


def _marker(session: str = "s", i: int = 0) -> MarkerAdded:
    return MarkerAdded(bot="b", session_id=session, marker=Marker(location="X", data={"i": i}))


def crash(server: NatsServer) -> None:
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()


def revive(server: NatsServer) -> None:
    server.stop()  # the process is gone: this only tidies up
    server.port = int(server.url.rsplit(":", 1)[1])  # same port, same store: a restarted server
    server.start()


async def revive_after(server: NatsServer, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(revive, server)


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[tuple]:
    """A connection through ``bus.connect`` and an event that is set when it loses its server."""
    nc = await bus.connect(nats_server.url, name="test")
    await bus.ensure_streams(nc.jetstream())
    down = asyncio.Event()

    async def lost() -> None:
        down.set()

    bus.on_disconnect(nc, lost)
    yield nc, down
    await nc.close()


def count_publishes(log: EventLog) -> list[BaseException | None]:
    """Wrap how the log tries a publish and waits for its answer (its publisher's ``ask``, for a checked
    append; JetStream's ``publish``, for a resend): one entry per try, the error it raised or None."""
    tries: list[BaseException | None] = []

    def counted(real):  # type: ignore[no-untyped-def]
        async def publish(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                ack = await real(*args, **kwargs)
            except BaseException as exc:
                tries.append(exc)
                raise
            tries.append(None)
            return ack
        return publish

    log.js.publish = counted(log.js.publish)  # type: ignore[method-assign]
    log.publisher.ask = counted(log.publisher.ask)  # type: ignore[method-assign]
    return tries


async def landed(log: EventLog, event_id: str, session: str = "s") -> list[int]:
    return [seq for seq, e in await log.read("b", session) if e.id == event_id]


async def test_an_append_while_the_server_is_down_lands_once_when_it_is_back(nats_server, conn) -> None:
    nc, down = conn
    log = EventLog(nc, outage_s=45)
    first = await log.append(_marker())
    tries = count_publishes(log)
    crash(nats_server)
    await asyncio.wait_for(down.wait(), BOUND_S)
    back = asyncio.create_task(revive_after(nats_server, 3))

    event = _marker(i=1)
    seq = await asyncio.wait_for(log.append(event, expected_last_seq=first, timeout=1.0), BOUND_S)
    await back

    # The bus really failed it. The try buffered while the server was down is flushed on reconnect and
    # lands; the retry then meets "wrong last sequence" (the server checks that before the Msg-Id), which
    # the log answers by finding its own event right after the expected sequence.
    assert isinstance(tries[0], TimeoutError) and len(tries) >= 2
    assert await landed(log, event.id) == [seq]
    assert seq > first


async def test_a_batch_across_a_restart_lands_once_and_whole(nats_server, conn) -> None:
    nc, down = conn
    log = EventLog(nc, outage_s=45)
    first = await log.append(_marker())
    crash(nats_server)
    await asyncio.wait_for(down.wait(), BOUND_S)
    back = asyncio.create_task(revive_after(nats_server, 3))

    batch = [_marker(i=i) for i in range(5)]
    seqs = await asyncio.wait_for(
        log.append_batch(batch, expected_last_seq=first, msg_ids=[e.id for e in batch], timeout=1.0), BOUND_S)
    await back

    events = await log.read("b", "s", after=first)
    assert [(s, e.id) for s, e in events] == list(zip(seqs, [e.id for e in batch]))
    assert seqs == list(range(seqs[0], seqs[0] + 5))


def _swallow_first_answer(publisher: Publisher) -> list[int]:
    """Make the publisher's first answer never arrive (it landed; the caller is never told); the sequence
    it carried is put in the list returned. Clearing the list swallows the next answer too."""
    real = publisher._on_answer
    swallowed: list[int] = []

    def losing_the_first(msg):  # type: ignore[no-untyped-def]
        if swallowed:
            return real(msg)
        swallowed.append(json.loads(msg.data)["seq"])

    publisher._on_answer = losing_the_first  # type: ignore[method-assign]
    return swallowed


async def test_an_append_whose_answer_was_lost_is_not_doubled(nc) -> None:
    """The first try lands but its answer never comes (a timeout): the retry must not append it again,
    with or without an expected sequence (the server may answer the retry with 'wrong last sequence')."""
    log = EventLog(nc, outage_s=10)
    real = log.js.publish
    resent: list[int] = []

    async def publish_losing_the_first_answer(*args, **kwargs):  # a resend of the publisher's
        ack = await real(*args, **kwargs)
        if not resent:
            resent.append(ack.seq)
            raise nats.errors.TimeoutError
        return ack

    log.js.publish = publish_losing_the_first_answer  # type: ignore[method-assign]
    # Every append goes through the log's publisher; each part below loses the answer of its first try.
    lost = _swallow_first_answer(log.publisher)
    plain = _marker(i=1)
    seq = await log.append(plain, timeout=0.5)  # resent by the publisher's deadline (and lost once more)
    assert lost == [seq] and resent == [seq] and await landed(log, plain.id) == [seq]

    lost.clear()
    guarded = _marker(i=2)
    seq2 = await log.append(guarded, expected_last_seq=seq, timeout=0.5)  # tried again by the append itself
    assert lost == [seq2] and await landed(log, guarded.id) == [seq2]

    lost.clear()
    answer = _marker(i=3)
    assert await log.append_once(answer, msg_id="answer:1", timeout=0.5) == lost[0]  # ours, not someone else's
    assert await log.append_once(_marker(i=4), msg_id="answer:1") is None  # now really someone else's


async def test_a_batch_whose_answer_was_lost_is_not_doubled(nc) -> None:
    log = EventLog(nc, outage_s=10)
    first = await log.append(_marker())
    real = log._send_batch
    sent = []

    async def send_losing_the_first_answer(*args, **kwargs):
        seqs = await real(*args, **kwargs)
        if not sent:
            sent.append(seqs)
            raise BusTimeout("the answer was lost")
        return seqs

    log._send_batch = send_losing_the_first_answer  # type: ignore[method-assign]
    batch = [_marker(i=i) for i in range(4)]

    seqs = await log.append_batch(batch, expected_last_seq=first, msg_ids=[e.id for e in batch])

    assert sent == [seqs]  # the first try committed; the resend found that out instead of appending again
    events = await log.read("b", "s", after=first)
    assert [(s, e.id) for s, e in events] == list(zip(seqs, [e.id for e in batch]))


def test_wrong_last_sequence_is_known_by_both_codes_and_by_its_text() -> None:
    assert is_wrong_last_sequence(10071)
    assert is_wrong_last_sequence(10164)
    assert is_wrong_last_sequence(None, "wrong last sequence: 12")
    assert is_wrong_last_sequence(400, "Wrong Last Sequence")
    assert not is_wrong_last_sequence(10008, "JetStream system temporarily unavailable")


@pytest.mark.parametrize("err_code, description", [(10071, "wrong last sequence: 3"), (10164, "wrong last sequence")])
async def test_a_replicated_streams_conflict_raises_wrong_last_sequence(nc, err_code, description) -> None:
    log = EventLog(nc, outage_s=5)

    async def conflict(*args, **kwargs):
        raise APIError(code=400, err_code=err_code, description=description)

    log.publisher.ask = conflict  # type: ignore[method-assign]  # how a checked append publishes
    with pytest.raises(WrongLastSequence):
        await log.append(_marker(), expected_last_seq=3)


async def test_an_outage_longer_than_the_budget_raises_bus_unavailable(nats_server, conn) -> None:
    nc, down = conn
    log = EventLog(nc, outage_s=1.5)
    await log.append(_marker())
    tries = count_publishes(log)
    crash(nats_server)
    await asyncio.wait_for(down.wait(), BOUND_S)

    with pytest.raises(BusUnavailable) as raised:
        await asyncio.wait_for(log.append(_marker(i=1), timeout=0.5), BOUND_S)

    assert len(tries) >= 2 and all(t is not None for t in tries)  # it did retry, and every try failed
    assert raised.value.retryable
    assert "PETRIBUS_BUS_OUTAGE_S" in str(raised.value) and "nats-server" in str(raised.value)

    await asyncio.to_thread(revive, nats_server)  # and once the bus is back, so is the log
    event = _marker(i=2)
    seq = await log.append(event)
    assert await landed(log, event.id) == [seq]


async def test_a_read_that_must_see_a_sequence_catches_a_lagging_replica_up_from_the_leader(nc) -> None:
    log = EventLog(nc)
    seqs = [await log.append(_marker(i=i)) for i in range(5)]
    real = log._read_direct

    async def lagging_replica(subject, after, timeout, until=None):
        return [(s, e) for s, e in await real(subject, after, timeout, until) if s <= seqs[2]]

    log._read_direct = lagging_replica  # type: ignore[method-assign]

    assert [s for s, _ in await log.read("b", "s")] == seqs[:3]  # the replica really lags
    assert [s for s, _ in await log.read("b", "s", at_least=seqs[3])] == seqs[:4]
    assert [s for s, _ in await log.read("b", "s", at_least=seqs[4])] == seqs


async def test_a_pull_consumer_keeps_delivering_after_the_server_restarts(nats_server, conn) -> None:
    nc, down = conn
    js = nc.jetstream()
    await bus.ensure_event_consumer(js, "outage-test", ack_wait_s=30)
    log = EventLog(nc, outage_s=45)
    consumer = PullConsumer(nc, subjects.EVENTS_STREAM, "outage-test", max_inflight=8)
    await consumer.start()
    try:
        before = _marker(i=1)
        await log.append(before)
        [msg] = await asyncio.wait_for(consumer.next_batch(8), BOUND_S)
        await msg.ack()
        consumer.release()

        crash(nats_server)
        await asyncio.wait_for(down.wait(), BOUND_S)
        await asyncio.to_thread(revive, nats_server)
        after = _marker(i=2)
        await log.append(after)

        got = []
        async with asyncio.timeout(BOUND_S):
            while not any(after.id.encode() in m.data for m in got):
                got += await consumer.next_batch(8)
        # An ack sent just before the kill may be lost with the server: ``before`` may come again.
        assert all(before.id.encode() in m.data for m in got[:-1])
        for m in got:
            await m.ack()
        consumer.release(len(got))
    finally:
        await consumer.stop()


async def test_a_pull_consumer_whose_durable_was_deleted_recreates_it_and_goes_on(nc) -> None:
    js = nc.jetstream()
    recreated = []

    async def ensure() -> None:
        recreated.append(True)
        await bus.ensure_event_consumer(js, "gone-test", ack_wait_s=30)

    await ensure()
    log = EventLog(nc)
    consumer = PullConsumer(nc, subjects.EVENTS_STREAM, "gone-test", max_inflight=8, ensure=ensure)
    await consumer.start()
    try:
        async with asyncio.timeout(BOUND_S):  # our pull request is waiting at the consumer
            while (await js.consumer_info(subjects.EVENTS_STREAM, "gone-test")).num_waiting < 1:
                await asyncio.sleep(0.02)
        await js.delete_consumer(subjects.EVENTS_STREAM, "gone-test")
        event = _marker(i=1)
        await log.append(event)

        msgs = []
        async with asyncio.timeout(BOUND_S):
            while not any(event.id.encode() in m.data for m in msgs):
                msgs += await consumer.next_batch(8)
        assert len(recreated) >= 2  # the first create, then the consumer's own
        for m in msgs:
            await m.ack()
        consumer.release(len(msgs))
    finally:
        await consumer.stop()


async def test_a_pipelined_publish_whose_answer_never_comes_settles_once(nc) -> None:
    """An answer lost with its server never comes: the future must still settle, and the resend must not
    land a second message."""
    publisher = Publisher(nc, outage_s=10)
    swallowed = _swallow_first_answer(publisher)
    subject = "pb.work.cpu.b.s.f1"
    ack = await asyncio.wait_for(await publisher.publish_soon(subject, b"{}", msg_id="work:f1", timeout=0.5), BOUND_S)

    assert swallowed == [ack.seq] and ack.duplicate  # the resend found the first one
    assert (await nc.jetstream().stream_info(subjects.WORK_STREAM)).state.messages == 1


async def test_a_pipelined_event_sent_while_the_server_is_down_lands_once(nats_server, conn) -> None:
    nc, down = conn
    log = EventLog(nc, outage_s=45)
    await log.append(_marker())
    crash(nats_server)
    await asyncio.wait_for(down.wait(), BOUND_S)
    back = asyncio.create_task(revive_after(nats_server, 2))

    events = [_marker(i=i) for i in range(1, 4)]
    seqs = await asyncio.wait_for(log.append_many(events, timeout=1.0), BOUND_S)
    soon = _marker(i=4)
    seq = await asyncio.wait_for(await log.append_soon(soon, timeout=1.0), BOUND_S)
    await back

    assert back.done() and nats_server.running
    for event, s in zip([*events, soon], [*seqs, seq]):
        assert await landed(log, event.id) == [s]


async def test_reconnect_hooks_work_on_a_client_not_made_by_bus_connect(nats_server) -> None:
    own_calls = []

    async def own_reconnected_cb() -> None:
        own_calls.append(True)

    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                            reconnected_cb=own_reconnected_cb)
    back = asyncio.Event()

    async def hook() -> None:
        back.set()

    bus.on_reconnect(nc, hook)
    try:
        crash(nats_server)
        await asyncio.to_thread(revive, nats_server)
        await asyncio.wait_for(back.wait(), BOUND_S)
        assert own_calls == [True]  # the client's own callback still runs
    finally:
        await nc.close()
