"""People in the loop, end to end over the WebSocket against a real nats-server: confirm=True
transitions (accept, reject, timeout, restarts) and ``context.confirm`` questions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from petribus.answers import to_confirmation, to_file_request, to_question
from petribus.core import fold
from petribus.errors import AlreadyAnswered, UnknownRequest
from petribus.events import (
    AcceptTransition,
    ConfirmRequest,
    ConfirmResponse,
    ConfirmTransition,
    ErrorEvent,
    InputFileRequest,
    InputFileResponse,
    Marker,
    MarkerAdded,
    RejectTransition,
    TransitionFailed,
    TransitionFired,
    TransitionStarted,
)
from petribus.settings import Settings
from petribus_gateway.app import Gateway
from petribus_scheduler.app import Scheduler

from .conftest import app
from .harness import Client, Stack, session_state

HITL = app("hitl_bot")
PARTS = ("scheduler", "executor", "gateway")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with Stack(settings, [HITL], parts=PARTS) as s:
        yield s


async def _session(stack: Stack) -> tuple[Client, str]:
    client = await Client.connect(stack.ws_url("hitl"))
    created = await client.recv()
    assert created["type"] == "session_created"
    return client, created["value"]


def _marker(location: str, **data: Any) -> dict[str, Any]:
    return {"type": "marker_added", "value": {"location": location, "data": data}}


def _is(type_: str, **metadata: Any):
    return lambda e: e["type"] == type_ and all(e["metadata"].get(k) == v for k, v in metadata.items())


def _completed(transition: str):
    return _is("transition_completed", transition_name=transition)


async def _ask(client: Client, location: str, **data: Any) -> tuple[str, dict[str, Any]]:
    """Add a marker and wait for the confirmation it causes: (task id, the marker as added)."""
    await client.send(_marker(location, **data))
    added = await client.until(lambda e: e["type"] == "marker_added" and e["value"]["data"] == data)
    ask = await client.until(lambda e: e["type"] == "confirm_transition"
                             and [m["id"] for m in e["value"]["markers"]] == [added["value"]["id"]])
    return ask["metadata"]["task_id"], added["value"]


async def _synced(client: Client, text: str) -> dict[str, Any]:
    """A round trip through the log: everything the client sent before has been handled (or refused)."""
    await client.send({"type": "user_message", "value": text})
    return await client.until(lambda e: e["type"] == "user_message" and e["value"] == text)


# --- the fold: what is pending, and which answer counts (pure, no I/O) --------------------------

B, S = "hitl", "s1"


def _log(*events: Any) -> list[tuple[int, Any]]:
    return list(enumerate(events, start=1))


def _running(firing: str = "f1", confirm: bool = False) -> list[Any]:
    return [MarkerAdded(bot=B, session_id=S, marker=Marker(id="m1", location="Refund", data={"amount": 1})),
            TransitionFired(bot=B, session_id=S, firing_id=firing, transition="refund", consumed=["m1"],
                            confirm=confirm)]


def test_fold_counts_the_first_answer_to_a_question_only() -> None:
    ask = ConfirmRequest(bot=B, session_id=S, request_id="q1", firing_id="f1", transition="refund",
                         description="ok?")
    yes = ConfirmResponse(bot=B, session_id=S, request_id="q1", accepted=True)
    state = fold(_log(*_running(), ask))
    assert set(state.pending_requests) == {"q1"}
    answered = to_question(yes)(state)
    assert answered.firing_id == "f1" and answered.cause == ask.id  # the answer names what it answers

    no = ConfirmResponse(bot=B, session_id=S, request_id="q1", accepted=False)
    asked_again = ConfirmRequest(bot=B, session_id=S, request_id="q1", firing_id="f1", description="again?")
    state = fold(_log(*_running(), ask, yes, no, asked_again))
    assert not state.pending_requests and state.closed_requests == {"q1"}  # asked again: still answered
    with pytest.raises(AlreadyAnswered):
        to_question(yes)(state)
    with pytest.raises(UnknownRequest) as unknown:
        to_question(ConfirmResponse(bot=B, session_id=S, request_id="q2", accepted=True))(state)
    assert unknown.value.code == "unknown_request"


def test_fold_ignores_questions_of_firings_not_running_and_keeps_an_earlier_runs_open_until_the_end() -> None:
    stray = ConfirmRequest(bot=B, session_id=S, request_id="q0", firing_id="nosuch", description="?")
    waiting = ConfirmRequest(bot=B, session_id=S, request_id="qw", firing_id="f1", description="?")
    assert not fold(_log(*_running(confirm=True), stray, waiting)).pending_requests

    # A re-run (or a retry) asks the same questions under the same ids and reads their answers: they stay
    # open across runs of the firing, and close when the firing ends for good.
    first_run = ConfirmRequest(bot=B, session_id=S, request_id="q1", firing_id="f1", description="?")
    file_ask = InputFileRequest(bot=B, session_id=S, file_id="file1", firing_id="f1", description="a file")
    rerun = TransitionStarted(bot=B, session_id=S, firing_id="f1", transition="refund", executor="x",
                              attempt=2)
    retry = TransitionFailed(bot=B, session_id=S, firing_id="f1", transition="refund", error="x", final=False,
                             attempt=2)
    state = fold(_log(*_running(), first_run, file_ask, rerun, retry, first_run))
    assert set(state.pending_requests) == {"q1"} and set(state.pending_files) == {"file1"}
    assert not state.closed_requests

    ended = TransitionFailed(bot=B, session_id=S, firing_id="f1", transition="refund", error="x", attempt=3)
    state = fold(_log(*_running(), first_run, file_ask, rerun, ended))
    assert not state.pending_requests and not state.pending_files
    assert state.closed_requests == {"q1", "file1"}


def test_fold_tracks_file_requests_and_the_files_that_answer_them() -> None:
    ask = InputFileRequest(bot=B, session_id=S, file_id="file1", firing_id="f1", description="a file")
    upload = InputFileResponse(bot=B, session_id=S, file_id="file1", name="a.txt", size=3, stored_id="blob1")
    timeout = InputFileResponse(bot=B, session_id=S, file_id="file1", reason="timeout")
    state = fold(_log(*_running(), ask))
    assert set(state.pending_files) == {"file1"}
    assert to_file_request(upload)(state).firing_id == "f1"
    state = fold(_log(*_running(), ask, upload, timeout))  # the first answer counts
    assert not state.pending_files and list(state.files) == ["blob1"]
    lapsed = fold(_log(*_running(), ask, timeout))
    assert not lapsed.pending_files and not lapsed.files
    with pytest.raises(AlreadyAnswered):
        to_file_request(upload)(lapsed)


def test_fold_knows_each_pending_confirmations_deadline_and_refuses_answers_to_others() -> None:
    asked = ConfirmTransition(bot=B, session_id=S, firing_id="f1", transition="refund", timeout=30.0,
                              ts=100.0)
    again = ConfirmTransition(bot=B, session_id=S, firing_id="f1", transition="refund", timeout=5.0)
    state = fold(_log(*_running(confirm=True), asked, again))
    [waiting] = state.awaiting_confirmation()
    assert waiting.confirm_deadline == 130.0  # the first ask counts
    accept = AcceptTransition(bot=B, session_id=S, firing_id="f1")
    assert to_confirmation(accept)(state).transition == "refund"
    with pytest.raises(UnknownRequest) as unknown:
        to_confirmation(AcceptTransition(bot=B, session_id=S, firing_id="f9"))(state)
    assert unknown.value.code == "unknown_task"
    state = fold(_log(*_running(confirm=True), asked, accept))
    with pytest.raises(AlreadyAnswered, match="already accepted"):
        to_confirmation(RejectTransition(bot=B, session_id=S, firing_id="f1"))(state)


# --- confirm=True transitions -------------------------------------------------------------------


async def test_accepted_confirmation_runs_and_every_client_sees_it_in_order(stack: Stack, nc) -> None:
    a, sid = await _session(stack)
    b = await Client.connect(stack.ws_url("hitl", session_id=sid))
    leaving = await Client.connect(stack.ws_url("hitl", session_id=sid))
    try:
        await a.send(_marker("Order", id=7))
        ask = await a.until("confirm_transition")
        task = ask["metadata"]["task_id"]
        assert ask["metadata"]["transition_name"] == "cancel"
        assert ask["value"]["description"] == "Cancels an order."
        assert ask["value"]["timeout"] == stack.settings.confirm_timeout_s
        [offered] = ask["value"]["markers"]
        assert offered["location"] == "Order" and offered["data"] == {"id": 7}
        assert await b.until("confirm_transition") == ask
        await leaving.until("confirm_transition")
        await leaving.close()  # gone while the question is open; comes back below

        await b.send({"type": "accept_transition", "value": task, "request_id": "b-1"})
        done = await a.until(_completed("cancel"))
        assert done["value"]["outputs"][0]["data"] == {"id": 7}
        assert await b.until(_completed("cancel")) == done
        back = await Client.connect(stack.ws_url("hitl", session_id=sid,
                                                 since=leaving.events[-1]["metadata"]["seq"]))
        try:
            await back.until(_completed("cancel"))
        finally:
            await back.close()
    finally:
        await a.close()
        await b.close()

    accepted = next(e for e in a.events if e["type"] == "accept_transition")
    assert accepted["value"] == task and accepted["metadata"]["request_id"] == "b-1"
    assert accepted["metadata"]["transition_name"] == "cancel"
    assert [e["type"] for e in a.events if e["metadata"]["task_id"] == task] == [
        "transition_fired", "confirm_transition", "accept_transition", "transition_started",
        "transition_completed"]
    # Every client saw the same events in the same order; the one that came back lost nothing.
    assert a.events == b.events == leaving.events + back.events
    _, log = await session_state(nc, "hitl", sid)
    assert [seq for seq, _ in log] == [e["metadata"]["seq"] for e in a.events]


async def test_rejected_confirmation_returns_markers_and_is_not_asked_again(stack: Stack, nc) -> None:
    client, sid = await _session(stack)
    try:
        task, first = await _ask(client, "Order", id=1)
        await client.send({"type": "reject_transition", "value": {"task_id": task, "reason": "not this one"}})
        rejected = await client.until("reject_transition")
        assert rejected["value"] == {"task_id": task, "reason": "not this one"}
        assert rejected["metadata"]["task_id"] == task and rejected["metadata"]["transition_name"] == "cancel"

        # The same order added again is a new marker: that one is asked about, the rejected one is not.
        again, second = await _ask(client, "Order", id=1)
        assert second["id"] != first["id"]
        await client.send({"type": "accept_transition", "value": again})
        await client.until(_completed("cancel"))

        # Other transitions may still take a marker one transition was refused: a rejected ticket
        # is not escalated again, it is closed.
        ticket_task, ticket = await _ask(client, "Ticket", id=5)
        await client.send({"type": "reject_transition", "value": ticket_task})
        closed = await client.until(_completed("close"))
        assert closed["value"]["outputs"][0]["data"] == {"id": 5}
    finally:
        await client.close()

    asks = [e for e in client.events if e["type"] == "confirm_transition"]
    assert [[m["id"] for m in e["value"]["markers"]] for e in asks] == [[first["id"]], [second["id"]],
                                                                        [ticket["id"]]]
    fired = next(e for e in client.events if e["type"] == "transition_fired"
                 and e["metadata"]["transition_name"] == "close")
    assert fired["value"]["consumed"] == [ticket["id"]]
    state, log = await session_state(nc, "hitl", sid)
    assert [m.id for m in state.marking()["Order"]] == [first["id"]]  # back where it was, still there
    assert [m.data for m in state.marking()["Cancelled"]] == [{"id": 1}]
    assert not state.in_flight
    assert [e.reason for _, e in log if isinstance(e, RejectTransition)] == ["not this one", "rejected"]


async def test_two_pending_confirmations_are_answered_in_reverse_order(stack: Stack, nc) -> None:
    client, sid = await _session(stack)
    try:
        first, _ = await _ask(client, "Order", id=1)
        second, _ = await _ask(client, "Order", id=2)
        async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
            detail = (await http.get(f"/bots/hitl/sessions/{sid}")).json()
            waiting = {f["firing_id"]: f["status"] for f in detail["in_flight"]}
            assert waiting == {first: "awaiting_confirmation", second: "awaiting_confirmation"}

            await client.send({"type": "accept_transition", "value": second})
            done = await client.until(_completed("cancel"))
            answered = await http.post(f"/bots/hitl/sessions/{sid}/confirmations/{first}",
                                       json={"accepted": False, "reason": "keep it"})
            assert answered.status_code == 201, answered.text
            assert answered.json()["event"]["type"] == "reject_transition"
        await client.until(_is("reject_transition", task_id=first))
    finally:
        await client.close()

    assert done["metadata"]["task_id"] == second and done["value"]["outputs"][0]["data"] == {"id": 2}
    state, _ = await session_state(nc, "hitl", sid)
    assert [m.data for m in state.marking()["Order"]] == [{"id": 1}]
    assert [m.data for m in state.marking()["Cancelled"]] == [{"id": 2}]


async def test_unknown_double_and_racing_answers_are_refused_and_never_enter_the_log(
    stack: Stack, nc
) -> None:
    a, sid = await _session(stack)
    b = await Client.connect(stack.ws_url("hitl", session_id=sid))
    try:
        done, _ = await _ask(a, "Order", id=1)
        await a.send({"type": "accept_transition", "value": done})
        await a.until(_completed("cancel"))
        refused = [
            ({"type": "accept_transition", "value": "nosuchtask"}, "unknown_task", "'nosuchtask'"),
            ({"type": "accept_transition", "value": done}, "already_answered", "already ended"),
            ({"type": "reject_transition", "value": {"task_id": done}}, "already_answered", done),
            ({"type": "accept_transition", "value": 42}, "invalid_value", "got a number '42'"),
            ({"type": "accept_transition", "value": "a.b"}, "invalid_value", "'a.b'"),
            ({"type": "reject_transition", "value": {"task_id": done, "reason": 5}}, "invalid_value",
             "reason"),
            ({"type": "confirm_response", "value": {"request_id": "nope", "accepted": True}},
             "unknown_request", "'nope'"),
            ({"type": "confirm_response", "value": {"request_id": "nope", "accepted": "yes"}},
             "invalid_value", "true or false"),
            ({"type": "confirm_response", "value": True}, "invalid_value", "request_id"),
        ]
        for sent, code, text in refused:
            await a.send(sent)
            error = await a.recv()
            assert error["type"] == "error" and error["value"]["code"] == code, (sent, error)
            assert text in error["value"]["message"], (sent, error["value"]["message"])
            assert error["metadata"]["seq"] is None

        # Two clients answer one confirmation at the same moment: one answer lands, the other is told.
        raced, _ = await _ask(a, "Order", id=2)
        await asyncio.gather(a.send({"type": "accept_transition", "value": raced}),
                             b.send({"type": "reject_transition", "value": raced}))
        await asyncio.gather(_synced(a, "a done"), _synced(b, "b done"))
    finally:
        await a.close()
        await b.close()

    answers = [e for e in b.events if e["metadata"]["task_id"] == raced
               and e["type"] in ("accept_transition", "reject_transition")]
    assert len(answers) == 1
    errors = [e for c in (a, b) for e in c.events if e["type"] == "error"
              and e["value"]["code"] == "already_answered" and raced in e["value"]["message"]]
    assert len(errors) == 1
    _, log = await session_state(nc, "hitl", sid)
    assert not any(isinstance(e, ErrorEvent) for _, e in log)
    answered = [e.firing_id for _, e in log if isinstance(e, (AcceptTransition, RejectTransition))]
    assert answered.count(raced) == 1 and answered.count(done) == 1


async def test_unanswered_confirmation_times_out_even_across_a_scheduler_restart(
    settings: Settings, nc
) -> None:
    quick = settings.model_copy(update={"confirm_timeout_s": 1.5})
    async with Stack(quick, [HITL], parts=PARTS) as stack:
        client, sid = await _session(stack)
        try:
            task, marker = await _ask(client, "Order", id=3)
            # The scheduler that asked goes away; the one that replaces it knows nothing of the wait
            # but what the log and the durable timer say.
            await stack.services["scheduler"].stop()
            stack.services["scheduler"] = replacement = Scheduler(quick, stack.nets)
            await replacement.start()
            rejected = await client.until("reject_transition")
            await client.send({"type": "accept_transition", "value": task})
            late = await client.until("error")
        finally:
            await client.close()

    assert rejected["metadata"]["task_id"] == task and rejected["value"]["reason"] == "timeout"
    assert late["value"]["code"] == "already_answered"
    state, log = await session_state(nc, "hitl", sid)
    assert [m.id for m in state.marking()["Order"]] == [marker["id"]] and not state.in_flight
    asked = next(e for _, e in log if e.type == "confirm_transition")
    timed_out = next(e for _, e in log if isinstance(e, RejectTransition))
    assert timed_out.ts >= asked.ts + 1.5  # not before its time
    assert replacement.deadlines.expired == 1


async def test_a_pending_confirmation_survives_gateway_and_scheduler_restarts(stack: Stack, nc) -> None:
    client, sid = await _session(stack)
    task, _ = await _ask(client, "Order", id=4)
    seen = client.events[-1]["metadata"]["seq"]
    await client.close()

    for part, make in (("gateway", Gateway), ("scheduler", Scheduler)):
        await stack.services[part].stop()
        stack.services[part] = make(stack.settings, stack.nets)
        await stack.services[part].start()

    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        detail = (await http.get(f"/bots/hitl/sessions/{sid}")).json()
    assert [(f["firing_id"], f["status"]) for f in detail["in_flight"]] == [(task, "awaiting_confirmation")]
    again = await Client.connect(stack.ws_url("hitl", session_id=sid, since=seen))
    try:
        await again.send({"type": "accept_transition", "value": task})
        done = await again.until(_completed("cancel"))
    finally:
        await again.close()
    assert done["metadata"]["task_id"] == task
    assert [e["type"] for e in again.events if e["metadata"]["task_id"] == task] == [
        "accept_transition", "transition_started", "transition_completed"]


# --- context.confirm ----------------------------------------------------------------------------


async def test_context_confirm_resumes_each_call_with_its_own_answer(stack: Stack, nc) -> None:
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Refund", amount=10))
        await client.send(_marker("Refund", amount=20))
        asks = {}
        while len(asks) < 2:
            q = await client.until("confirm_request")
            asks[q["value"]] = q
        ten, twenty = asks["Refund 10 EUR?"], asks["Refund 20 EUR?"]
        assert ten["metadata"]["transition_name"] == "refund" and ten["metadata"]["task_id"]
        said = next(e for e in client.events
                    if e["type"] == "agent_message" and e["value"] == "About to refund 10")
        assert said["metadata"]["seq"] < ten["metadata"]["seq"]  # what it said before asking comes first

        # Answered in reverse order, one over the WebSocket and one over REST.
        await client.send({"type": "confirm_response",
                           "value": {"request_id": twenty["metadata"]["request_id"], "accepted": True}})
        first = await client.until(_completed("refund"))
        async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
            answered = await http.post(
                f"/bots/hitl/sessions/{sid}/confirm_requests/{ten['metadata']['request_id']}",
                json={"accepted": False})
            assert answered.status_code == 201, answered.text
            second = await client.until(_completed("refund"))
            again = await http.post(
                f"/bots/hitl/sessions/{sid}/confirm_requests/{ten['metadata']['request_id']}",
                json={"accepted": True})
            unknown = await http.post(f"/bots/hitl/sessions/{sid}/confirm_requests/nosuch",
                                      json={"accepted": True})
            bad = await http.post(f"/bots/hitl/sessions/{sid}/confirm_requests/x", json={"accepted": "maybe"})
    finally:
        await client.close()

    assert first["value"]["outputs"][0]["data"] == {"amount": 20, "approved": True}
    assert second["value"]["outputs"][0]["data"] == {"amount": 10, "approved": False}
    assert again.status_code == 409 and again.json()["code"] == "already_answered"
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_request"
    assert bad.status_code == 422
    state, log = await session_state(nc, "hitl", sid)
    assert not state.pending_requests
    responses = [(e.request_id, e.accepted, e.reason) for _, e in log if isinstance(e, ConfirmResponse)]
    assert responses == [(twenty["metadata"]["request_id"], True, None),
                         (ten["metadata"]["request_id"], False, None)]


async def test_context_confirm_that_nobody_answers_returns_false_and_refuses_a_late_answer(
    stack: Stack, nc
) -> None:
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Refund", amount=30, timeout=0.5))
        asked = await client.until("confirm_request")
        lapsed = await client.until("confirm_response")
        done = await client.until(_completed("refund"))
        await client.send({"type": "confirm_response",
                           "value": {"request_id": asked["metadata"]["request_id"], "accepted": True}})
        late = await client.until("error")
    finally:
        await client.close()

    assert lapsed["metadata"]["request_id"] == asked["metadata"]["request_id"] and lapsed["value"] is False
    assert done["value"]["outputs"][0]["data"] == {"amount": 30, "approved": False}
    assert late["value"]["code"] == "already_answered" and "timed out" in late["value"]["message"]
    _, log = await session_state(nc, "hitl", sid)
    [response] = [e for _, e in log if isinstance(e, ConfirmResponse)]
    assert (response.accepted, response.reason) == (False, "timeout")
    assert response.firing_id == asked["metadata"]["task_id"]


async def test_a_question_whose_transition_ended_is_no_longer_pending(stack: Stack, nc) -> None:
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Question", text="Wait for me?"))
        asked = await client.until("confirm_request")
        failed = await client.until("transition_failed")
        await client.send({"type": "confirm_response",
                           "value": {"request_id": asked["metadata"]["request_id"], "accepted": True}})
        late = await client.until("error")
    finally:
        await client.close()

    assert "ran longer than its timeout" in failed["value"]["error"]
    assert late["value"]["code"] == "already_answered" and "has ended" in late["value"]["message"]
    state, log = await session_state(nc, "hitl", sid)
    assert not state.pending_requests and asked["metadata"]["request_id"] in state.closed_requests
    assert not any(isinstance(e, ConfirmResponse) for _, e in log)
