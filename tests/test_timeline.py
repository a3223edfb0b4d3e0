"""The gateway's timeline against a real nats-server: the state at every sequence from its snapshots
equals the fold of that prefix, it catches up with appends, keeps to its memory budget and forgets
deleted sessions."""

from __future__ import annotations

import random

import pytest

from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import (
    AgentMessage,
    ConfirmRequest,
    ConfirmResponse,
    HaltSet,
    Marker,
    MarkerAdded,
    MemoryUpdated,
    OutputFile,
    TransitionCompleted,
    TransitionFailed,
    TransitionFired,
    UserMessage,
    new_id,
)
from petribus_gateway import timeline as timeline_module
from petribus_gateway.timeline import Timeline


def _runs(bot: str, session_id: str, count: int, rng: random.Random) -> list:
    """Markers added, claimed, completed or failed (their markers come back): ``count`` runs of it. A run
    may also chat, remember, ask a question (answered later, or never), send a file or change the halts,
    so that every part of a state changes along the log."""
    events: list = []
    waiting: list[Marker] = []
    asked: list[str] = []
    for n in range(count):
        m = Marker(location="Item", data={"n": n})
        events.append(MarkerAdded(bot=bot, session_id=session_id, marker=m))
        waiting.append(m)
        if rng.random() < 0.7:
            taken = waiting.pop(0)
            firing = new_id()
            events.append(TransitionFired(bot=bot, session_id=session_id, firing_id=firing, transition="work",
                                          consumed=[taken.id]))
            if rng.random() < 0.2:
                events.append(TransitionFailed(bot=bot, session_id=session_id, firing_id=firing,
                                               transition="work", error="no"))
            else:
                events.append(TransitionCompleted(
                    bot=bot, session_id=session_id, firing_id=firing, transition="work",
                    outputs=[Marker(location="Done", data={"n": taken.data["n"]})]))
        roll = rng.random()
        if roll < 0.1:
            events.append(UserMessage(bot=bot, session_id=session_id, text=f"message {n}"))
            events.append(AgentMessage(bot=bot, session_id=session_id, text=f"reply {n}", reply_to=events[-1].id))
        elif roll < 0.2:
            events.append(MemoryUpdated(bot=bot, session_id=session_id, memory={"n": n}))
        elif roll < 0.3:
            asked.append(new_id())
            events.append(ConfirmRequest(bot=bot, session_id=session_id, request_id=asked[-1], description=f"ok {n}?"))
        elif roll < 0.4 and asked:
            events.append(ConfirmResponse(bot=bot, session_id=session_id, request_id=asked.pop(0), accepted=True))
        elif roll < 0.45:
            events.append(OutputFile(bot=bot, session_id=session_id, file_id=new_id(), name=f"f{n}.txt", size=n))
        elif roll < 0.5:
            events.append(HaltSet(bot=bot, session_id=session_id, before=["work"] if n % 2 else []))
    return events


async def _append(log: EventLog, events: list) -> list:
    seqs = await log.append_many(events)
    return list(zip(seqs, events))


async def test_state_at_every_seq_from_snapshots_is_the_fold_of_the_prefix(nc, monkeypatch):
    monkeypatch.setattr(timeline_module, "MIN_EVERY", 25)  # many snapshots in a short log
    log = EventLog(nc)
    rng = random.Random(3)
    logged = await _append(log, _runs("b", "s1", 200, rng))
    # Another session interleaved, so the session's sequences are not contiguous.
    await _append(log, _runs("b", "other", 20, rng))
    logged += await _append(log, _runs("b", "s1", 40, rng))
    timeline = Timeline(log)
    for i, (seq, _) in enumerate(logged):
        state = await timeline.state_at("b", "s1", seq)
        expected = fold(logged[: i + 1])
        assert state.last_seq == seq
        assert state == expected  # the whole state: chat, memory, questions, files and halts too
    session = timeline._cache[("b", "s1")]
    assert len(session.snapshots) > 5  # the answers above came from snapshots, not from zero
    # Each part changed along the log, so a snapshot sharing any of them with a later state would show.
    last = fold(logged)
    assert last.chat and last.memory and last.pending_requests and last.closed_requests and last.files
    assert any(isinstance(ev, HaltSet) and ev.before for _, ev in logged)
    # Appended after the first questions: caught up, and a past state is unchanged by it.
    logged += await _append(log, _runs("b", "s1", 30, rng))
    assert (await timeline.state_at("b", "s1")).marking() == fold(logged).marking()
    assert (await timeline.state_at("b", "s1", logged[10][0])).marking() == fold(logged[:11]).marking()
    # A snapshot is not changed by folding on from it.
    copy = session.snapshots[2].marking()
    await timeline.state_at("b", "s1", logged[-1][0] - 1)
    assert session.snapshots[2].marking() == copy


async def test_history_steps_add_and_consume_what_the_fold_did(nc, monkeypatch):
    monkeypatch.setattr(timeline_module, "MIN_EVERY", 25)
    log = EventLog(nc)
    logged = await _append(log, _runs("b", "s2", 120, random.Random(5)))
    steps, last = await Timeline(log).history("b", "s2", after=logged[40][0], limit=30)
    assert last == logged[-1][0]
    assert [s.seq for s in steps] == [seq for seq, _ in logged[41:71]]
    for step in steps:
        i = next(k for k, (seq, _) in enumerate(logged) if seq == step.seq)
        before = {m.id for ms in fold(logged[:i]).marking().values() for m in ms}
        after = {m.id for ms in fold(logged[: i + 1]).marking().values() for m in ms}
        assert {m.id for m in step.added} == after - before
        assert {m.id for m in step.consumed} == before - after


async def test_the_cache_keeps_to_its_budget_and_forgets_deleted_sessions(nc):
    log = EventLog(nc)
    rng = random.Random(9)
    for name in ("a", "b", "c"):
        await _append(log, _runs("b", name, 60, rng))
    weights = []
    for name in ("a", "b", "c"):
        timeline = Timeline(log)
        await timeline.state_at("b", name)
        weights.append(timeline._cache[("b", name)].weight)
    budget = min(weights[1] + weights[2], weights[0] + weights[2]) - 1  # any two are over it
    timeline = Timeline(log, budget=budget)
    for name in ("a", "b", "c"):
        await timeline.state_at("b", name)
    assert list(timeline._cache) == [("b", "c")]
    timeline = Timeline(log, budget=weights[2] // 2)  # even alone over it: the one asked about is kept
    for name in ("a", "c"):
        await timeline.state_at("b", name)
    assert list(timeline._cache) == [("b", "c")]
    timeline = Timeline(log, sessions=2)
    for name in ("a", "b", "c"):
        await timeline.state_at("b", name)
    assert list(timeline._cache) == [("b", "b"), ("b", "c")]
    await log.delete("b", "c")
    assert (await timeline.state_at("b", "c")).last_seq == 0
    assert ("b", "c") not in timeline._cache


@pytest.mark.parametrize("limit", [1, 7, 1000])
async def test_history_pages_cover_the_log_once(nc, limit):
    log = EventLog(nc)
    logged = await _append(log, _runs("b", "s3", 50, random.Random(limit)))
    timeline = Timeline(log)
    seen, after = [], 0
    while True:
        steps, last = await timeline.history("b", "s3", after=after, limit=limit)
        if not steps:
            break
        assert len(steps) <= limit
        seen += [s.seq for s in steps]
        after = steps[-1].seq
    assert seen == [seq for seq, _ in logged] and last == logged[-1][0]


async def test_a_question_reads_the_log_only_as_far_as_it_asks_and_a_known_deletion_needs_no_read(nc):
    """With the gateway's tombstones at hand, a first question about an early point of a long session reads
    its log up to that point only; one about a point read already reads nothing; and a session known to
    be deleted is forgotten without a read (here its log is left in place, so a read would have found it)."""
    import asyncio

    from petribus import deletion, subjects
    from petribus.deletion import GuardedEventLog, Tombstones

    tombstones = Tombstones(nc)
    await tombstones.start()
    try:
        log = GuardedEventLog(nc, tombstones=tombstones)
        logged = await _append(log, _runs("b", "lazy", 150, random.Random(5)))
        timeline = Timeline(log)
        early = logged[40][0]
        assert await timeline.state_at("b", "lazy", early) == fold(logged[:41])
        session = timeline._cache[("b", "lazy")]
        assert session.head.last_seq == early and len(session.payloads) == 41  # read that far, no further
        assert await timeline.state_at("b", "lazy", logged[5][0]) == fold(logged[:6])
        assert len(session.payloads) == 41  # a point read already: nothing read
        assert (await timeline.state_at("b", "lazy")).last_seq == logged[-1][0]  # now: the whole log
        assert len(session.payloads) == len(logged)

        await (await deletion.bucket(nc.jetstream())).put(subjects.tombstone("b", "lazy"), b"{}")
        async with asyncio.timeout(10):
            while not tombstones.deleted("b", "lazy"):
                await asyncio.sleep(0.01)
        assert (await timeline.state_at("b", "lazy", early)).last_seq == 0  # forgotten, as if never there
        assert ("b", "lazy") not in timeline._cache or not timeline._cache[("b", "lazy")].payloads
    finally:
        await tombstones.close()
