"""Beam's own client messages, as Beam's bot gateway (beam-cloud/beta9, pkg/abstractions/experimental/bot)
reads them, over the real WebSocket: answers carry ``metadata.task_id`` / ``transition_name`` /
``session_id`` and a ``confirm_response`` the ``pair_id`` of its ``confirm_request`` with the value
"true" or "false"; every event we send has a ``pair_id`` ("" when it pairs nothing)."""

from __future__ import annotations

import pytest

from petribus.bus import EventLog
from petribus.events import (
    AcceptTransition,
    AgentMessage,
    ConfirmResponse,
    PromptRequest,
    PromptResponse,
    RejectTransition,
    UserMessage,
    to_client,
)

from .conftest import app
from .harness import Client, Stack

HITL = app("hitl_bot")
PARTS = ("scheduler", "executor", "gateway")


@pytest.fixture
async def stack(settings, nc):
    async with Stack(settings, [HITL], parts=PARTS) as s:
        yield s


async def _session(stack) -> tuple[Client, str]:
    client = await Client.connect(stack.ws_url("hitl"))
    created = await client.until("session_created")
    assert created["pair_id"] == ""
    return client, created["value"]


def _marker(location: str, **data) -> dict:
    return {"type": "marker_added", "value": {"location": location, "data": data}}


async def test_beam_accept_and_reject_name_the_task_in_metadata(stack, nc):
    client, sid = await _session(stack)
    try:
        for n in (1, 2):
            await client.send(_marker("Order", id=n))
        asks = [await client.until("confirm_transition"), await client.until("confirm_transition")]
        first, second = (a["metadata"]["task_id"] for a in asks)
        # Exactly as a Beam client sends them: the task in metadata, the value empty.
        await client.send({"type": "accept_transition", "value": "",
                           "metadata": {"task_id": first, "transition_name": "cancel", "session_id": sid}})
        await client.send({"type": "reject_transition", "value": "",
                           "metadata": {"task_id": second, "transition_name": "cancel", "session_id": sid}})
        accepted = await client.until("accept_transition")
        rejected = await client.until("reject_transition")
        assert accepted["metadata"]["task_id"] == first and rejected["metadata"]["task_id"] == second
        await client.until(lambda e: e["type"] == "transition_completed" and e["metadata"]["task_id"] == first)
    finally:
        await client.close()
    log = [ev for _, ev in await EventLog(nc).read("hitl", sid)]
    assert [ev.firing_id for ev in log if isinstance(ev, AcceptTransition)] == [first]
    assert [ev.firing_id for ev in log if isinstance(ev, RejectTransition)] == [second]


async def test_beam_confirm_response_answers_by_pair_id(stack, nc):
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Refund", amount=40))
        asked = await client.until("confirm_request")
        pair = asked["pair_id"]
        assert pair and pair == asked["metadata"]["request_id"]
        await client.send({"type": "confirm_response", "value": "true", "pair_id": pair,
                           "metadata": {"session_id": sid, "transition_name": "refund",
                                        "task_id": asked["metadata"]["task_id"]}})
        answered = await client.until("confirm_response")
        assert answered["pair_id"] == pair and answered["value"] is True
        done = await client.until(lambda e: e["type"] == "transition_completed" and e["metadata"]["transition_name"] == "refund")
        assert done["value"]["outputs"][0]["data"] == {"amount": 40, "approved": True}
    finally:
        await client.close()
    [response] = [ev for _, ev in await EventLog(nc).read("hitl", sid) if isinstance(ev, ConfirmResponse)]
    assert response.request_id == pair and response.accepted is True


@pytest.mark.parametrize(("message", "code", "says"), [
    ({"type": "accept_transition", "value": "", "metadata": {"task_id": "t1", "colour": "red"}},
     "unknown_field", "colour"),
    ({"type": "accept_transition", "value": "t1", "pair_id": "p1"}, "invalid_value", "pair_id goes with"),
    ({"type": "user_message", "value": "hi", "pair_id": "no spaces"}, "invalid_value", "pair_id"),
    ({"type": "accept_transition", "value": "t2", "metadata": {"task_id": "t1"}}, "invalid_value",
     "two different tasks"),
    ({"type": "confirm_response", "value": "maybe", "pair_id": "p1"}, "invalid_value", "true or false"),
    ({"type": "user_message", "value": "hi", "metadata": {"session_id": "someone-else"}}, "invalid_value",
     "not this connection's session"),
    ({"type": "user_message", "value": "hi", "metadata": {"request_id": 7}}, "invalid_value",
     "object of strings"),
])
async def test_beam_shaped_mistakes_get_an_error_and_the_connection_stays(stack, nc, message, code, says):
    client, sid = await _session(stack)
    try:
        await client.send(message)
        error = await client.until("error")
        assert error["value"]["code"] == code and says in error["value"]["message"]
        await client.send({"type": "user_message", "value": "still here"})
        await client.until(lambda e: e["type"] == "user_message" and e["value"] == "still here")
    finally:
        await client.close()


async def test_a_transition_name_that_does_not_match_the_task_is_refused(stack, nc):
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Order", id=3))
        task = (await client.until("confirm_transition"))["metadata"]["task_id"]
        await client.send({"type": "accept_transition", "value": "",
                           "metadata": {"task_id": task, "transition_name": "escalate"}})
        error = await client.until("error")
        assert "not of 'escalate'" in error["value"]["message"]
    finally:
        await client.close()
    assert not [ev for _, ev in await EventLog(nc).read("hitl", sid) if isinstance(ev, AcceptTransition)]


async def test_beam_user_message_pair_id_comes_back_on_its_reply(settings, nc):
    """Beam pairs a user's message with the bot's reply: the reply carries the message's pair_id."""
    async with Stack(settings, [HITL], parts=(*PARTS, "llm")) as stack:
        client, sid = await _session(stack)
        try:
            await client.send({"type": "user_message", "value": "/help", "pair_id": "beam-pair-7"})
            said = await client.until("user_message")
            reply = await client.until("agent_message")
            await client.send({"type": "user_message", "value": "/help"})
            unpaired = await client.until(lambda e: e["type"] == "agent_message"
                                          and e["metadata"]["event_id"] != reply["metadata"]["event_id"])
        finally:
            await client.close()
    assert said["pair_id"] == "beam-pair-7" and reply["pair_id"] == "beam-pair-7"
    assert unpaired["pair_id"] == ""
    log = [ev for _, ev in await EventLog(nc).read("hitl", sid)]
    assert [ev.pair_id for ev in log if isinstance(ev, UserMessage)] == ["beam-pair-7", None]
    assert [ev.pair_id for ev in log if isinstance(ev, AgentMessage)] == ["beam-pair-7", None]


def test_a_prompt_and_its_response_are_paired_by_the_request_id():
    asked = PromptRequest(bot="b", session_id="s", text="why?", request_id="r1")
    answered = PromptResponse(bot="b", session_id="s", text="because", request_id="r1")
    assert to_client(asked, 3)["pair_id"] == to_client(answered, 4)["pair_id"] == "r1"
