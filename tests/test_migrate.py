"""Sessions an older petribus stored under one subject each: services refuse such a log, saying what to
do, and ``petribus.migrate`` moves them to a subject per kind of event, once, resuming after a crash."""

from __future__ import annotations

import pytest

from petribus import bus
from petribus.bus import EventLog
from petribus.core import fold
from petribus.errors import BusError
from petribus.events import Marker, MarkerAdded, SessionCreated, TransitionCompleted, TransitionFired, encode
from petribus.migrate import legacy_sessions, migrate


def _old_session(session_id: str, n: int) -> list:
    events: list = [SessionCreated(bot="b", session_id=session_id)]
    for i in range(n):
        m = Marker(location="Item", data={"n": i})
        events.append(MarkerAdded(bot="b", session_id=session_id, marker=m))
        events.append(TransitionFired(bot="b", session_id=session_id, firing_id=f"f{i}", transition="work",
                                      consumed=[m.id]))
        events.append(TransitionCompleted(bot="b", session_id=session_id, firing_id=f"f{i}", transition="work",
                                          outputs=[Marker(location="Done", data={"n": i})]))
    return events


async def _store_old(nc, session_id: str, events: list) -> None:
    js = nc.jetstream()
    for e in events:  # as an older petribus appended them: one subject per session
        await js.publish(f"pb.ev.b.{session_id}", encode(e), headers={"Nats-Msg-Id": e.id})


async def test_an_old_layout_is_refused_then_moved_once_in_order(nc):
    old = {"s1": _old_session("s1", 5), "s2": _old_session("s2", 400)}  # s2: more than one atomic batch
    for sid, events in old.items():
        await _store_old(nc, sid, events)
    with pytest.raises(BusError) as refused:
        await bus.ensure_streams(nc.jetstream())
    assert refused.value.code == "legacy_layout" and "petribus streams" in str(refused.value)

    log = EventLog(nc)
    assert await migrate(log) == sum(len(e) for e in old.values())
    assert await legacy_sessions(log) == {}
    for sid, events in old.items():
        moved = await log.read("b", sid)
        assert [e.id for _, e in moved] == [e.id for e in events]  # every event, once, in its order
        assert fold(moved).marking() == fold(list(enumerate(events, 1))).marking()
    assert {s for s in (await log.sessions("b"))} == {"s1", "s2"}
    assert await migrate(log) == 0  # nothing left: a second run moves nothing
    await bus.ensure_streams(nc.jetstream())  # and services start again


async def test_a_migration_cut_short_resumes_after_what_it_moved(nc):
    events = _old_session("s3", 10)
    await _store_old(nc, "s3", events)
    log = EventLog(nc)
    await log.append_batch(events[:7], expected_last_seq=0, msg_ids=[f"migrate:{e.id}" for e in events[:7]])
    assert await migrate(log) == len(events) - 7
    assert [e.id for _, e in await log.read("b", "s3")] == [e.id for e in events]
