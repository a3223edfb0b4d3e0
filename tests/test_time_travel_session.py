"""Time travel over a session with everything in it, on the whole stack with a scripted model: the whole
body of ``?at=`` at every sequence is the fold of that prefix (chat, memory, pending questions and file
requests, confirmations, files, not only the marking), what a client saw live is what ``?at=`` shows
later, and a fork's chat reaches the model's prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from petribus.bus import EventLog
from petribus.core import SessionState, fold
from petribus.events import (
    AgentMessage,
    ConfirmRequest,
    ConfirmTransition,
    InputFileRequest,
    InputFileResponse,
    SessionForked,
    TransitionCompleted,
    UserMessage,
)
from petribus.settings import Settings
from petribus_gateway import timeline as timeline_module

from .conftest import app
from .harness import Stack
from .scripted_llm import ScriptedLLM, call, say
from .test_time_travel import _wait

BOT = "errands"
ERRAND = "please run the errand: groceries"
SHOPPING_LIST = b"milk\neggs\n"


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM() as server:
        server.when(ERRAND, call("Errand", what="groceries"), say("I started the groceries errand."))
        server.when("remember the blue one", say("Noted: the blue one."))
        server.when("thanks", say("You're welcome."))
        yield server


@pytest.fixture
async def http(settings: Settings, llm: ScriptedLLM, nc: Any, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[httpx.AsyncClient]:
    # Snapshots every few events, so that ?at= answers come from snapshots and short folds from them.
    monkeypatch.setattr(timeline_module, "MIN_EVERY", 3)
    settings = settings.model_copy(update={"openai_api_key": SecretStr("sk-test"), "openai_base_url": llm.base_url})
    async with Stack(settings, [app(BOT)]) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as client:
        yield client


async def _until(log: EventLog, session_id: str, done: Any, timeout: float = 60.0) -> list:
    """The session's events once ``done(events)`` holds (``test_time_travel._wait``, on this bot)."""
    return await _wait(log, BOT, session_id, done, timeout)


def _one(kind: type, **fields: Any) -> Any:
    """``done`` for ``_until``: an event of ``kind`` with these fields is in the log."""
    return lambda events: any(isinstance(ev, kind) and all(getattr(ev, k) == v for k, v in fields.items())
                              for _, ev in events)


def _replied(text: str) -> Any:
    def done(events: list) -> bool:
        asked = [ev.id for _, ev in events if isinstance(ev, UserMessage) and ev.text == text]
        return bool(asked) and any(isinstance(ev, AgentMessage) and ev.reply_to == asked[0] for _, ev in events)
    return done


def _marker(m: Any) -> dict:
    return {"id": m.id, "location": m.location, "data": m.data}


def _expected(session_id: str, state: SessionState, events: list[dict]) -> dict:
    """The body ``GET /bots/{bot}/sessions/{id}`` should answer for ``state``, spelled out field by field
    from the fold (not through the gateway's own conversion), with ``events`` as clients see them."""
    return {
        "bot": BOT, "session_id": session_id, "last_seq": state.last_seq, "events": events,
        "marking": {loc: [_marker(m) for m in ms] for loc, ms in state.marking().items()},
        "in_flight": [{"firing_id": f.id, "transition": f.transition, "status": f.status,
                       "consumed": [_marker(p.marker) for p in f.consumed], "fired_seq": f.fired_seq,
                       "attempts": f.attempts} for f in state.in_flight.values()],
        "chat": [{"role": t.role, "text": t.text, "seq": t.seq, "event_id": t.event_id, "firing_id": t.firing_id}
                 for t in state.chat],
        "memory": state.memory,
        "pending_requests": [
            *({"type": "confirm_request", "request_id": rid, "description": q.description, "task_id": q.firing_id,
               "transition": q.transition, "upload_url": None, "timeout": q.timeout}
              for rid, q in state.pending_requests.items()),
            *({"type": "input_file_request", "request_id": fid, "description": q.description,
               "task_id": q.firing_id, "transition": q.transition, "upload_url": q.upload_url, "timeout": q.timeout}
              for fid, q in state.pending_files.items()),
        ],
        "files": [{"file_id": key, "name": f.name, "size": f.size,
                   "url": f"/bots/{BOT}/sessions/{session_id}/files/{key}",
                   "direction": "input" if isinstance(f, InputFileResponse) else "output"}
                  for key, f in state.files.items()],
    }


async def _detail(http: httpx.AsyncClient, session_id: str, **params: Any) -> dict:
    r = await http.get(f"/bots/{BOT}/sessions/{session_id}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_whole_state_at_every_seq_is_the_fold_of_that_prefix(http, nc):
    log = EventLog(nc)
    sid = (await http.post(f"/bots/{BOT}/sessions")).json()["session_id"]
    seen: list[dict] = []  # what a client saw live, at moments with something pending

    # Chat: the model adds an errand; the errand says, remembers, asks yes or no, asks for a file.
    await http.post(f"/bots/{BOT}/sessions/{sid}/messages", json={"text": ERRAND})
    events = await _until(log, sid, _one(ConfirmRequest))
    question = next(ev for _, ev in events if isinstance(ev, ConfirmRequest))
    seen.append(await _detail(http, sid))
    r = await http.post(f"/bots/{BOT}/sessions/{sid}/confirm_requests/{question.request_id}",
                        json={"accepted": True})
    assert r.status_code == 201, r.text
    events = await _until(log, sid, _one(InputFileRequest))
    wanted = next(ev for _, ev in events if isinstance(ev, InputFileRequest))
    seen.append(await _detail(http, sid))
    r = await http.put(wanted.upload_url, content=SHOPPING_LIST, params={"name": "list.txt"})
    assert r.status_code == 201, r.text
    await _until(log, sid, _one(TransitionCompleted, transition="run_errand"))
    # A firing that waits for the user's confirmation, later accepted.
    await http.post(f"/bots/{BOT}/sessions/{sid}/markers", json={"location": "Purchase", "data": {"item": "tea"}})
    events = await _until(log, sid, _one(ConfirmTransition))
    held = next(ev for _, ev in events if isinstance(ev, ConfirmTransition))
    seen.append(await _detail(http, sid))
    r = await http.post(f"/bots/{BOT}/sessions/{sid}/confirmations/{held.firing_id}", json={"accepted": True})
    assert r.status_code == 201, r.text
    await _until(log, sid, _one(TransitionCompleted, transition="buy"))
    await http.post(f"/bots/{BOT}/sessions/{sid}/messages", json={"text": "thanks"})
    events = await _until(log, sid, lambda evs: _replied(ERRAND)(evs) and _replied("thanks")(evs))

    now = await _detail(http, sid)
    assert [e["metadata"]["seq"] for e in now["events"]] == [seq for seq, _ in events]
    bodies = []
    for i, (seq, _) in enumerate(events):
        body = await _detail(http, sid, at=seq)
        assert body == _expected(sid, fold(events[: i + 1]), now["events"][: i + 1]), f"at seq {seq}"
        bodies.append(body)
    assert bodies[-1] == now
    # What a client saw while something was pending is what the past shows.
    for live in seen:
        assert await _detail(http, sid, at=live["last_seq"]) == live

    # The session had every part of a body, at some step, and each changed on its way.
    assert {(t["role"], t["firing_id"] is None) for t in now["chat"]} == {("user", True), ("agent", True),
                                                                          ("agent", False)}
    assert now["memory"] == [{"errand": "groceries"}] and bodies[0]["memory"] == []
    asked = [[p["type"] for p in b["pending_requests"]] for b in bodies]
    assert ["confirm_request"] in asked and ["input_file_request"] in asked and asked[-1] == []
    assert any(f["status"] == "awaiting_confirmation" for b in bodies for f in b["in_flight"])
    assert sorted(f["direction"] for f in now["files"]) == ["input", "output"]
    assert len({len(b["files"]) for b in bodies}) == 3  # none, the upload, and the receipt too
    assert now["marking"] == {"Receipt": now["marking"]["Receipt"], "Bought": now["marking"]["Bought"]}
    assert now["marking"]["Receipt"][0]["data"] == {"what": "groceries", "approved": True,
                                                    "size": len(SHOPPING_LIST)}


async def test_fork_carries_chat_and_the_llm_sees_it(http, llm, nc):
    log = EventLog(nc)
    sid = (await http.post(f"/bots/{BOT}/sessions")).json()["session_id"]
    await http.post(f"/bots/{BOT}/sessions/{sid}/messages", json={"text": "remember the blue one"})
    events = await _until(log, sid, _replied("remember the blue one"))
    r = await http.post(f"/bots/{BOT}/sessions/{sid}/fork", json={"at": events[-1][0]})
    assert r.status_code == 201, r.text
    fork = r.json()["session_id"]
    await http.post(f"/bots/{BOT}/sessions/{fork}/messages", json={"text": "which one did I mean?"})
    forked = await _until(log, fork, _replied("which one did I mean?"))

    [asked] = llm.requests_for("which one did I mean?")
    assert [(m["role"], m["content"]) for m in asked.messages[1:]] == [
        ("user", "remember the blue one"), ("assistant", "Noted: the blue one."), ("user", "which one did I mean?")]
    assert f"this session continues session {sid} as of its step {events[-1][0]}" in asked.system
    first = forked[0][1]
    assert isinstance(first, SessionForked) and [t.text for t in first.chat] == [
        "remember the blue one", "Noted: the blue one."]
    # The fork's question reached only the fork: the source asked the model once, and was not appended to.
    assert len(llm.requests_for("remember the blue one")) == 1
    assert await log.read(BOT, sid) == events
