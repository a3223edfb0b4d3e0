"""Time travel over the real stack: the state at any sequence, the history's marking changes, forks
(in the middle of a chain, with firings in flight, onto changed code, onto a grown net, onto a net the
markers do not fit; what a fork keeps of halts and environments) and halting before a transition."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from petribus.bus import EventLog
from petribus.core import SessionState, fold
from petribus.events import HaltSet, SessionCreated, SessionForked, TransitionCompleted, TransitionFired
from petribus.loader import load_net
from petribus_gateway.fork import opening

from .conftest import APPS
from .harness import Stack

CHAIN = f"{APPS / 'chain.py'}:bot"
CHAIN_V2 = f"{APPS / 'chain.py'}:v2"
STRICT = f"{APPS / 'chain_strict.py'}:bot"
GROWN = f"{APPS / 'chain_grown.py'}:bot"
STEPS = 5
PARTS = ("scheduler", "executor", "gateway")


async def _wait(log: EventLog, bot: str, session_id: str, done: Any, timeout: float = 60.0) -> list:
    """The session's events once ``done(events)`` holds (woken by each appended event, not a timer)."""
    async with asyncio.timeout(timeout):
        while True:
            events = await log.read(bot, session_id)
            if done(events):
                return events
            last = events[-1][0] if events else 0
            await log.wait_for(bot, session_id, after=last, match=lambda ev: True, timeout=timeout)


def _results(events: list) -> list[dict]:
    return sorted((m.data for m in fold(events).marking().get("Result", [])), key=lambda d: d["n"])


def _finished(count: int):
    return lambda events: len(fold(events).marking().get("Result", [])) == count


async def _chain_session(http: httpx.AsyncClient, log: EventLog, tasks: int) -> tuple[str, list]:
    sid = (await http.post("/bots/chain/sessions")).json()["session_id"]
    for n in range(tasks):
        r = await http.post(f"/bots/chain/sessions/{sid}/markers", json={"location": "Task", "data": {"n": n}})
        assert r.status_code == 201, r.text
    return sid, await _wait(log, "chain", sid, _finished(tasks))


@pytest.fixture
async def stack(settings, nc):
    async with Stack(settings, [CHAIN, CHAIN_V2, STRICT, GROWN], parts=PARTS) as s:
        yield s


@pytest.fixture
async def http(stack):
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as client:
        yield client


async def test_state_at_every_seq_is_the_fold_of_that_prefix(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=3)
    assert len(events) > 3 * (STEPS + 1) * 3  # fired, started, completed per step, at least
    for i, (seq, _) in enumerate(events):
        r = await http.get(f"/bots/chain/sessions/{sid}", params={"at": seq})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = fold(events[: i + 1])
        assert body["last_seq"] == seq
        assert [e["metadata"]["seq"] for e in body["events"]] == [s for s, _ in events[: i + 1]]
        assert body["marking"] == {loc: [m.model_dump() for m in ms] for loc, ms in expected.marking().items()}
        assert [f["firing_id"] for f in body["in_flight"]] == list(expected.in_flight)
    # Between two of the session's events, the state is that of the earlier one; without events, the same.
    between = await http.get(f"/bots/chain/sessions/{sid}", params={"at": events[4][0], "events": "false"})
    assert between.json()["events"] == [] and between.json()["last_seq"] == events[4][0]


async def test_history_pages_carry_each_steps_marking_change(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=2)
    steps, after = [], 0
    while True:
        page = (await http.get(f"/bots/chain/sessions/{sid}/history", params={"after": after, "limit": 7})).json()
        steps.extend(page["steps"])
        if page["next"] is None:
            break
        assert page["next"] == page["steps"][-1]["seq"]
        after = page["next"]
    assert [s["seq"] for s in steps] == [seq for seq, _ in events]
    # Replaying the changes from nothing gives the marking after every step.
    marking: dict[str, dict] = {}
    for i, step in enumerate(steps):
        for m in step["consumed"]:
            assert m["id"] in marking, f"step {step['seq']} consumed a marker that was not there"
            del marking[m["id"]]
        for m in step["added"]:
            marking[m["id"]] = m
        expected = fold(events[: i + 1]).marking()
        assert sorted(marking) == sorted(m.id for ms in expected.values() for m in ms)
    claims = [s for s in steps if s["event"]["type"] == "transition_fired"]
    assert claims and all(len(s["consumed"]) == 1 and not s["added"] for s in claims)


async def test_fork_in_the_middle_of_a_chain_reaches_the_same_end(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=2)
    completions = [seq for seq, ev in events if isinstance(ev, TransitionCompleted)]
    at = completions[len(completions) // 2]
    before = await log.read("chain", sid)
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": at})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["bot"] == "chain" and fork["source_session"] == sid and fork["source_seq"] == at
    forked = await _wait(log, "chain", fork["session_id"], _finished(2))
    first = forked[0][1]
    assert isinstance(first, SessionForked) and forked[0][0] == fork["seq"]
    assert (first.source_session, first.source_seq) == (sid, at)
    assert _results(forked) == _results(events)
    # It did only the rest of the work: fewer claims than the original, and none before the fork's start.
    claims = [ev for _, ev in forked if isinstance(ev, TransitionFired)]
    assert 0 < len(claims) < len([ev for _, ev in events if isinstance(ev, TransitionFired)])
    assert await log.read("chain", sid) == before  # the source is untouched


async def test_fork_puts_the_markers_of_firings_in_flight_back(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=1)
    fired = [(seq, ev) for seq, ev in events if isinstance(ev, TransitionFired)][2]
    at = fired[0]  # the claim landed; its run had not completed
    state = (await http.get(f"/bots/chain/sessions/{sid}", params={"at": at, "events": "false"})).json()
    assert [f["firing_id"] for f in state["in_flight"]] == [fired[1].firing_id]
    consumed = state["in_flight"][0]["consumed"]
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": at})
    assert r.status_code == 201, r.text
    forked = await _wait(log, "chain", r.json()["session_id"], _finished(1))
    first = forked[0][1]
    assert isinstance(first, SessionForked) and first.in_flight == [fired[1].firing_id]
    assert [m.model_dump() for m in first.markers] == consumed  # the claimed marker came back
    assert _results(forked) == _results(events)
    refired = [ev for _, ev in forked if isinstance(ev, TransitionFired)][0]
    assert refired.consumed == [consumed[0]["id"]] and refired.firing_id != fired[1].firing_id


async def test_fork_onto_changed_code_runs_the_new_code(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=1)
    completions = [seq for seq, ev in events if isinstance(ev, TransitionCompleted)]
    at = completions[2]  # begin and two steps done on v1
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": at, "bot": "chain_v2"})
    assert r.status_code == 201, r.text
    assert r.json()["bot"] == "chain_v2"
    forked = await _wait(log, "chain_v2", r.json()["session_id"], _finished(1))
    [result] = _results(forked)
    assert result["trail"] == ["v1-1", "v1-2", "v1-3", "v2-4", "v2-5"]
    [original] = _results(events)
    assert original["trail"] == [f"v1-{i}" for i in range(1, STEPS + 1)]


async def test_fork_onto_a_marker_model_with_a_new_field_fills_its_default(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=1)
    at = [seq for seq, ev in events if isinstance(ev, TransitionCompleted)][2]  # a Stage at step 3, on v1
    [stage] = fold([(seq, ev) for seq, ev in events if seq <= at]).marking()["Stage"]
    assert "weight" not in stage.data
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": at, "bot": "chain_grown"})
    assert r.status_code == 201, r.text
    forked = await _wait(log, "chain_grown", r.json()["session_id"],
                         lambda evs: "Archived" in fold(evs).marking())
    first = forked[0][1]
    assert isinstance(first, SessionForked)
    assert [m.data for m in first.markers] == [{**stage.data, "weight": 0}]  # as the new model dumps it
    # The new code ran on the old marker: two more steps, each weighed from the default up.
    [result] = [ev.outputs[0].data for _, ev in forked
                if isinstance(ev, TransitionCompleted) and ev.outputs and ev.outputs[0].location == "Result"]
    assert result == {"n": 0, "trail": ["v1-1", "v1-2", "v1-3", "g4", "g5"], "weight": 2}


async def test_fork_onto_a_net_with_a_new_transition_fires_it(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=1)
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[-1][0], "bot": "chain_grown"})
    assert r.status_code == 201, r.text
    forked = await _wait(log, "chain_grown", r.json()["session_id"],
                         lambda evs: "Archived" in fold(evs).marking())
    # The chain had ended in the source; in the fork, only the transition the source's net lacked fired.
    assert [ev.transition for _, ev in forked if isinstance(ev, TransitionFired)] == ["archive"]
    [archived] = fold(forked).marking()["Archived"]
    assert archived.data == {"n": 0, "steps": STEPS, "weight": 0}
    assert "Result" not in fold(forked).marking()
    assert not any(isinstance(ev, TransitionFired) and ev.transition == "archive" for _, ev in events)


async def test_fork_keeps_the_halts_the_source_had_at_that_seq(stack, http, nc):
    log = EventLog(nc)
    sid = (await http.post("/bots/chain/sessions")).json()["session_id"]
    assert (await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": ["advance"]})).status_code == 201
    await http.post(f"/bots/chain/sessions/{sid}/markers", json={"location": "Task", "data": {"n": 4}})
    events = await _wait(log, "chain", sid, lambda evs: any(ev.type == "confirm_transition" for _, ev in evs))
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[-1][0]})
    assert r.status_code == 201, r.text
    forked = await _wait(log, "chain", r.json()["session_id"],
                         lambda evs: any(ev.type == "confirm_transition" for _, ev in evs))
    # Right after session_forked, in the same batch: the halt, so the fork holds advance as the source did.
    assert isinstance(forked[0][1], SessionForked) and forked[1][0] == forked[0][0] + 1
    halt = forked[1][1]
    assert isinstance(halt, HaltSet) and halt.before == ["advance"] and halt.cause == forked[0][1].id
    held = next(ev for _, ev in forked if ev.type == "confirm_transition")
    assert held.transition == "advance"
    assert not any(isinstance(ev, TransitionCompleted) and ev.transition == "advance" for _, ev in forked)
    # A fork from before the halt was set has none.
    early = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[0][0]})
    assert not any(isinstance(ev, HaltSet) for _, ev in await log.read("chain", early.json()["session_id"]))


def test_a_fork_keeps_only_the_halts_its_target_net_can_hold():
    net = load_net(CHAIN)
    source = SessionState(bot="other", session_id="s", halt_before=frozenset({"advance", "begin", "gone"}))
    batch = opening(net, "new", source, 9, [], [], [], max_payload=1 << 20)
    assert [type(ev) for ev in batch] == [SessionForked, HaltSet]
    assert batch[1].before == ["advance", "begin"] and batch[1].bot == "chain" and batch[1].session_id == "new"
    source.halt_before = frozenset({"gone"})
    assert [type(ev) for ev in opening(net, "new", source, 9, [], [], [], max_payload=1 << 20)] == [SessionForked]


async def test_a_fork_records_no_deployment_environment(stack, http, nc):
    """Documented in docs/time-travel.md: session_forked has no environment, and the fold takes one only
    from session_created, so a fork of a session started in an environment has none."""
    log = EventLog(nc)
    created = SessionCreated(bot="chain", session_id="staged", env="staging")
    seq = await log.append(created)
    r = await http.post("/bots/chain/sessions/staged/fork", json={"at": seq})
    assert r.status_code == 201, r.text
    assert fold(await log.read("chain", "staged")).env == "staging"
    assert fold(await log.read("chain", r.json()["session_id"])).env is None


async def test_a_fork_that_does_not_fit_is_refused_whole(stack, http, nc):
    log = EventLog(nc)
    sid = (await http.post("/bots/chain/sessions")).json()["session_id"]
    # Hold the chain before it advances, so the marking has several stages when forked.
    assert (await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": ["advance"]})).status_code == 201
    for n in range(3):
        await http.post(f"/bots/chain/sessions/{sid}/markers", json={"location": "Task", "data": {"n": n}})
    events = await _wait(log, "chain", sid, lambda evs: sum(ev.type == "confirm_transition" for _, ev in evs) == 3)
    before = await log.sessions("chain_strict")
    r = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[-1][0], "bot": "chain_strict"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "fork_does_not_fit"
    assert "3 of 3 marker(s) do not fit" in body["message"] and body["message"].count("owner") == 3
    assert await log.sessions("chain_strict") == before  # nothing half-created


async def test_fork_refuses_bad_sequences_and_replays_a_keyed_retry(stack, http, nc):
    log = EventLog(nc)
    sid, events = await _chain_session(http, log, tasks=1)
    last = events[-1][0]
    past = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": last + 100})
    assert past.status_code == 422 and past.json()["code"] == "invalid_seq" and str(last) in past.json()["message"]
    early = await http.get(f"/bots/chain/sessions/{sid}", params={"at": events[0][0] - 1})
    assert early.status_code == 422 and str(events[0][0]) in early.json()["message"]
    missing = await http.post("/bots/chain/sessions/nope/fork", json={"at": 1})
    assert missing.status_code == 404
    headers = {"Idempotency-Key": "fork-once"}
    one = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[3][0]}, headers=headers)
    two = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[3][0]}, headers=headers)
    assert one.status_code == two.status_code == 201
    assert two.json()["session_id"] == one.json()["session_id"] and two.json()["replayed"] is True
    other = await http.post(f"/bots/chain/sessions/{sid}/fork", json={"at": events[4][0]}, headers=headers)
    assert other.status_code == 409


async def test_halt_before_holds_a_transition_until_accepted(stack, http, nc):
    log = EventLog(nc)
    sid = (await http.post("/bots/chain/sessions")).json()["session_id"]
    bad = await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": ["advance", "nope"]})
    assert bad.status_code == 422 and "nope" in bad.json()["message"]
    assert (await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": ["advance"]})).status_code == 201
    await http.post(f"/bots/chain/sessions/{sid}/markers", json={"location": "Task", "data": {"n": 7}})
    events = await _wait(log, "chain", sid, lambda evs: any(ev.type == "confirm_transition" for _, ev in evs))
    held = next(ev for _, ev in events if ev.type == "confirm_transition")
    assert held.transition == "advance"
    assert not any(isinstance(ev, TransitionCompleted) and ev.transition == "advance" for _, ev in events)
    # Clear the halt, then accept the held firing: the chain runs to its end without stopping again.
    assert (await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": []})).status_code == 201
    r = await http.post(f"/bots/chain/sessions/{sid}/confirmations/{held.firing_id}", json={"accepted": True})
    assert r.status_code == 201, r.text
    events = await _wait(log, "chain", sid, _finished(1))
    assert sum(ev.type == "confirm_transition" for _, ev in events) == 1
    # The held firing itself ran once accepted (not a new claim of its marker), and the chain took every step.
    assert [ev.firing_id for _, ev in events if isinstance(ev, TransitionCompleted)].count(held.firing_id) == 1
    assert _results(events) == [{"n": 7, "trail": [f"v1-{i}" for i in range(1, STEPS + 1)]}]


async def test_fork_copies_the_sessions_files(settings, nc):
    hitl = f"{APPS / 'hitl_bot.py'}:bot"
    log = EventLog(nc)
    async with Stack(settings, [hitl], parts=PARTS) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as http:
        sid = (await http.post("/bots/hitl/sessions")).json()["session_id"]
        await http.post(f"/bots/hitl/sessions/{sid}/markers", json={"location": "Blob", "data": {"size": 3000}})
        events = await _wait(log, "hitl", sid, lambda evs: any(ev.type == "output_file" for _, ev in evs))
        at = next(seq for seq, ev in events if ev.type == "output_file")
        r = await http.post(f"/bots/hitl/sessions/{sid}/fork", json={"at": at})
        assert r.status_code == 201, r.text
        fork = r.json()["session_id"]
        [info] = (await http.get(f"/bots/hitl/sessions/{fork}")).json()["files"]
        assert info["url"].startswith(f"/bots/hitl/sessions/{fork}/files/") and info["size"] == 3000
        got = await http.get(info["url"])
        assert got.status_code == 200 and got.content == b"x" * 3000
        # The fork's copy is its own: deleting the source leaves it downloadable.
        assert (await http.delete(f"/bots/hitl/sessions/{sid}")).status_code == 204
        again = await http.get(info["url"])
        assert again.status_code == 200 and again.content == b"x" * 3000


async def test_held_firings_never_stall_a_busy_session(settings, nc):
    """Many tasks with a halt: asking about each held firing races the session's other events. Events
    the asking caught up with must still be decided on (they once waited for the next lease or sweep:
    here both are an hour away, so a stall would hang the test until its timeout). Tasks keep coming, a
    few at a time, until the scheduler has raced them (a conflict or a catch-up), at least 12 of them:
    whether a burst of markers lands while a question is being asked depends on the machine's timing."""
    settings = settings.model_copy(update={"work_lease_s": 3600.0, "scheduler_sweep_s": 3600.0})
    log = EventLog(nc)
    async with Stack(settings, [CHAIN], parts=PARTS) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as http:
        scheduler = stack.services["scheduler"]

        def raced() -> bool:
            return scheduler.stats["conflicts"] > 0 or scheduler.stats["catchups"] > 0

        sid = (await http.post("/bots/chain/sessions")).json()["session_id"]
        assert (await http.put(f"/bots/chain/sessions/{sid}/halt", json={"before": ["advance"]})).status_code == 201
        tasks = 0
        while tasks < 12 or (not raced() and tasks < 200):
            await asyncio.gather(*[
                http.post(f"/bots/chain/sessions/{sid}/markers", json={"location": "Task", "data": {"n": n}})
                for n in range(tasks, tasks + 4)])
            tasks += 4
        await _wait(log, "chain", sid, lambda evs: sum(ev.type == "confirm_transition" for _, ev in evs) == tasks,
                    timeout=90.0)
        assert scheduler.stats["stalled"] == 0
        assert raced(), f"no conflict or catch-up in {tasks} tasks: the race this test is about never happened"
