"""EventLog.send against a real nats-server: an event sent with no answer asked for (a firing's start)."""

from __future__ import annotations

import pytest

from petribus import deletion, subjects
from petribus.bus import EventLog
from petribus.deletion import GuardedEventLog, SessionDeleted, Tombstones
from petribus.events import Marker, MarkerAdded, TransitionCompleted, TransitionStarted


async def test_a_sent_event_lands_once_before_what_the_connection_appends_after_it(nc) -> None:
    log = EventLog(nc)
    opened = await log.append(MarkerAdded(bot="b", session_id="s", marker=Marker(location="X", data={})))
    start = TransitionStarted(bot="b", session_id="s", firing_id="f1", transition="t", executor="x", attempt=1)
    await log.send(start, msg_id="start:f1:1")
    again = start.model_copy(update={"id": "another-event-id"})
    await log.send(again, msg_id="start:f1:1")  # a resend of the same start: de-duplicated by its Msg-Id
    done = await log.append(TransitionCompleted(bot="b", session_id="s", firing_id="f1", transition="t"))

    landed = await log.read("b", "s", after=opened)
    assert [(seq, e.type) for seq, e in landed] == [(opened + 1, "transition_started"),
                                                   (done, "transition_completed")]
    assert landed[0][1].id == start.id


async def test_a_guarded_log_sends_nothing_for_a_deleted_session(nc) -> None:
    tombstones = Tombstones(nc)
    await tombstones.start()
    try:
        await (await deletion.bucket(nc.jetstream())).put(subjects.tombstone("b", "gone"), b"{}")
        assert await tombstones.wait_deleted("b", "gone", timeout=10)
        log = GuardedEventLog(nc, tombstones=tombstones)
        with pytest.raises(SessionDeleted):
            await log.send(TransitionStarted(bot="b", session_id="gone", firing_id="f", transition="t",
                                             executor="x"))
        assert await log.read("b", "gone") == []
    finally:
        await tombstones.close()


async def test_a_log_stream_an_older_petribus_made_gets_the_claims_republish_on_the_next_start(nc) -> None:
    """Without the republish, schedulers send work after its claim (``claims_republished`` is False);
    ``ensure_streams`` (every start, ``petribus streams``) adds it to a stream made before it existed."""
    from dataclasses import replace

    from petribus import bus, subjects

    js = nc.jetstream()
    info = await js.stream_info(subjects.EVENTS_STREAM)
    await js.update_stream(replace(info.config, republish=None))
    assert not await bus.claims_republished(js)
    await bus.ensure_streams(js)
    assert await bus.claims_republished(js)
