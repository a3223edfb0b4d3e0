"""EventLog.append_batch against a real nats-server: all of a batch lands, contiguously, or none of it."""

from __future__ import annotations

import pytest

from petribus import subjects
from petribus.bus import MAX_BATCH, EventLog, WrongLastSequence
from petribus.events import Marker, MarkerAdded


def _markers(session: str, n: int) -> list[MarkerAdded]:
    return [MarkerAdded(bot="b", session_id=session, marker=Marker(location="X", data={"i": i}))
            for i in range(n)]


async def test_a_batch_lands_contiguously_right_after_the_expected_sequence(nc) -> None:
    log = EventLog(nc)
    first = await log.append(_markers("s", 1)[0])
    batch = _markers("s", MAX_BATCH)

    seqs = await log.append_batch(batch, expected_last_seq=first, msg_ids=[e.id for e in batch])

    assert seqs == list(range(first + 1, first + 1 + MAX_BATCH))
    landed = [(seq, e.id) for seq, e in await log.read("b", "s", after=first)]
    assert landed == list(zip(seqs, [e.id for e in batch]))


async def test_a_batch_behind_the_subject_is_refused_whole(nc) -> None:
    log = EventLog(nc)
    seq = await log.append(_markers("s", 1)[0])
    await log.append(_markers("s", 1)[0])  # someone else appended after our fold
    batch = _markers("s", 3)

    with pytest.raises(WrongLastSequence):
        await log.append_batch(batch, expected_last_seq=seq, msg_ids=[e.id for e in batch])

    assert await log.last_seq("b", "s") == seq + 1  # not one of the three landed


async def test_a_batch_is_one_session_and_at_most_the_server_limit(nc) -> None:
    log = EventLog(nc)
    with pytest.raises(ValueError):
        await log.append_batch(_markers("s", MAX_BATCH + 1), expected_last_seq=0,
                               msg_ids=[str(i) for i in range(MAX_BATCH + 1)])
    mixed = _markers("s", 1) + _markers("t", 1)
    with pytest.raises(ValueError):
        await log.append_batch(mixed, expected_last_seq=0, msg_ids=[e.id for e in mixed])
    assert (await nc.jetstream().stream_info(subjects.EVENTS_STREAM)).config.allow_atomic


async def test_an_embedded_server_that_syncs_every_write_starts_and_stores(tmp_path) -> None:
    """``PETRIBUS_SYNC_INTERVAL=always``: the server accepts its config and JetStream stores."""
    from petribus import bus
    from petribus.embedded import NatsServer

    server = NatsServer(tmp_path / "nats", sync_interval="always").start()
    try:
        assert 'sync_interval: "always"' in (tmp_path / "nats" / "nats-server.conf").read_text()
        nc = await bus.connect(server.url, name="test")
        try:
            await bus.ensure_streams(nc.jetstream())
            seq = await EventLog(nc).append(MarkerAdded(bot="b", session_id="s", marker=Marker(location="A", data={})))
            assert seq == 1
        finally:
            await nc.close()
    finally:
        server.stop()
