"""The LLM service with a model: the real ``openai`` client against a scripted OpenAI-compatible server.

The server (``scripted_llm.py``) runs over real HTTP on a loopback port, streams (SSE) or not, answers
from a script and records every request, so each test checks both what the user got (the log, the
WebSocket) and what the model was sent.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from petribus import logs, subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import (
    AgentMessage,
    ErrorEvent,
    Event,
    Marker,
    MarkerAdded,
    MemoryUpdated,
    PromptRequest,
    PromptResponse,
    SessionCreated,
    TransitionCompleted,
    TransitionFailed,
    TransitionFired,
    UserMessage,
    decode,
)
from petribus.loader import load_net
from petribus.settings import Settings
from petribus_llm import prompt
from petribus_llm.app import LLMService
from petribus_llm.conversation import Conversation
from petribus_llm.responder import Ask
from petribus_llm.tools import for_net

from .conftest import app
from .harness import Client, Stack
from .scripted_llm import ScriptedLLM, call, calls, fail, say

APP = app("llm_orders")
BOT = "llm_orders"
KEY = "sk-test-0123456789abcdefSECRETKEY"
HIDDEN = ("AuditEntry", "secret_note", "file_audit")


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM(key=KEY) as server:
        yield server


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log line of this test (structlog at debug, and the openai/httpx loggers), to scan for the key."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    loggers = [logging.getLogger(n) for n in ("openai", "httpx", "httpx2", "httpcore")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    logs.configure(level="debug", stream=out)
    try:
        yield out
    finally:
        logs.configure()
        for lg, level in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _with_model(settings: Settings, llm: ScriptedLLM, **update: Any) -> Settings:
    return settings.model_copy(update={"openai_api_key": SecretStr(KEY), "openai_base_url": llm.base_url,
                                       **update})


class Session:
    """One session's log, read as it lands (an ordered consumer), and a way to talk into it."""

    def __init__(self, nc: Any, session_id: str = "s1", bot: str = BOT) -> None:
        self.nc, self.bot, self.session_id = nc, bot, session_id
        self.log = EventLog(nc)
        self.events: list[tuple[int, Event]] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "Session":
        if await self.log.last_seq(self.bot, self.session_id) == 0:
            await self.log.append(SessionCreated(bot=self.bot, session_id=self.session_id))

        async def on_msg(msg: Any) -> None:
            self.events.append((msg.metadata.sequence.stream, decode(msg.data)))
            self._changed.set()

        self._sub = await self.nc.jetstream().subscribe(subjects.events(self.bot, self.session_id),
                                                        ordered_consumer=True, cb=on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def say(self, text: str) -> UserMessage:
        message = UserMessage(bot=self.bot, session_id=self.session_id, text=text)
        await self.log.append(message)
        return message

    async def add(self, location: str, **data: Any) -> MarkerAdded:
        added = MarkerAdded(bot=self.bot, session_id=self.session_id, marker=Marker(location=location, data=data))
        await self.log.append(added)
        return added

    def of(self, kind: type, **fields: Any) -> list[Any]:
        return [e for _, e in self.events
                if isinstance(e, kind) and all(getattr(e, k, None) == v for k, v in fields.items())]

    async def until(self, kind: type, count: int = 1, timeout: float = 30.0, **fields: Any) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(found := self.of(kind, **fields)) < count:
                self._changed.clear()
                await self._changed.wait()
        return found

    async def answer(self, message: UserMessage) -> AgentMessage | ErrorEvent:
        """The reply to ``message``: its agent_message, or the error event standing in for it."""
        async with asyncio.timeout(30):
            while True:
                for _, e in self.events:
                    if isinstance(e, AgentMessage) and e.reply_to == message.id:
                        return e
                    if isinstance(e, ErrorEvent) and e.cause == message.id:
                        return e
                self._changed.clear()
                await self._changed.wait()


async def _all_events(nc: Any) -> str:
    """Every event of every session of the bot, as stored."""
    log = EventLog(nc)
    out = []
    for sid in await log.sessions(BOT):
        out.extend(e.model_dump_json() for _, e in await log.read(BOT, sid))
    return "\n".join(out)


# -- the whole path: WebSocket, gateway, LLM service, scheduler, executor ---------------------------------------


async def test_please_cancel_alices_order_becomes_a_username_and_cancel_order_fires(
    settings: Settings, llm: ScriptedLLM, nc: Any, captured: io.StringIO
) -> None:
    llm.when("please cancel alice's order", call("UserName", name="alice"),
             say("I have asked to cancel alice's order."))
    llm.when("thanks", say("You're welcome."))
    async with Stack(_with_model(settings, llm), [APP]) as stack:
        client = await Client.connect(stack.ws_url(BOT))
        try:
            created = await client.recv()
            welcome = await client.recv()
            await client.send({"type": "user_message", "value": "please cancel alice's order", "request_id": "r1"})
            reply = await client.until(lambda e: e["type"] == "agent_message" and e["metadata"]["request_id"] == "r1")
            said = await client.until(lambda e: e["type"] == "agent_message" and e["metadata"]["task_id"])
            await client.until("memory_updated")
            await client.until(lambda e: e["type"] == "transition_completed"
                               and e["metadata"]["transition_name"] == "file_audit")
            await client.send({"type": "user_message", "value": "thanks", "request_id": "r2"})
            await client.until(lambda e: e["type"] == "agent_message" and e["metadata"]["request_id"] == "r2")
        finally:
            await client.close()
    session_id = created["value"]
    events = [e for _, e in await EventLog(nc).read(BOT, session_id)]

    assert welcome["type"] == "agent_message" and welcome["value"] == "Hi! Whose order should I cancel?"
    assert [e.text for e in events if isinstance(e, AgentMessage)].count(welcome["value"]) == 1
    [added] = [e for e in events if isinstance(e, MarkerAdded)]
    assert added.source == "llm" and added.marker.location == "UserName" and added.marker.data == {"name": "alice"}
    assert added.request_id == "r1"
    assert reply["value"] == "I have asked to cancel alice's order."
    assert said["value"] == "Order cancelled for alice" and said["metadata"]["transition_name"] == "cancel_order"
    # Streaming: the pieces came before the whole reply and add up to it.
    pieces = [e for e in client.events if e["type"] == "agent_message_delta"
              and e["metadata"]["event_id"] == reply["metadata"]["event_id"]]
    assert len(pieces) > 1 and "".join(p["value"] for p in pieces) == reply["value"]
    assert client.events.index(pieces[-1]) < client.events.index(reply)
    assert all(p["metadata"]["seq"] is None and p["metadata"]["request_id"] == "r1" for p in pieces)
    assert not any(e.type == "agent_message_delta" for e in events)  # not in the log

    first, correction, last = llm.requests_for("please cancel")[0], llm.requests_for("please cancel")[1], \
        llm.requests_for("thanks")[-1]
    assert first.body["stream"] is True and first.body["model"] == "gpt-test"
    assert first.tool_names == ["UserName", "OrderStatus", "Question", "Answer"]
    [user_tool] = [t for t in first.body["tools"] if t["function"]["name"] == "UserName"]
    assert user_tool["function"]["parameters"]["properties"]["name"]["type"] == "string"
    assert user_tool["function"]["parameters"]["required"] == ["name"]
    assert "Never invent data the user did not give" in first.system
    assert "cancel_order: Cancels a user's order." in first.system and "takes 1 UserName" in first.system
    assert "A bot to cancel customers' orders." in first.system
    assert [m["role"] for m in first.messages] == ["system", "assistant", "user"]  # the welcome, then the ask
    assert correction.messages[-1]["role"] == "tool" and "Accepted: UserName" in correction.messages[-1]["content"]
    # The next turn sees the conversation, the memory, and what the net did meanwhile.
    assert [m["content"] for m in last.messages[1:]] == [
        welcome["value"], "please cancel alice's order", "I have asked to cancel alice's order.", "thanks"]
    assert '{"cancelled": "alice"}' in last.system
    assert "cancel_order told the user: Order cancelled for alice" in last.system
    assert 'OrderStatus {"message": "order_cancelled for alice"}' in last.system
    # expose=False: the audit location, its field and its transition are never shown to the model,
    # yet the hidden transition fired.
    assert any(isinstance(e, TransitionCompleted) and e.transition == "file_audit" for e in events)
    for request in llm.requests:
        sent = json.dumps(request.body)
        assert not any(h in sent for h in HIDDEN), [h for h in HIDDEN if h in sent]
    assert KEY not in await _all_events(nc) and KEY not in json.dumps(client.events)
    assert KEY not in captured.getvalue()


# -- tools -------------------------------------------------------------------------------------------------------


async def test_one_reply_with_two_tool_calls_adds_two_markers(settings: Settings, llm: ScriptedLLM, nc: Any) -> None:
    llm.when("cancel alice and bob", calls(("UserName", {"name": "alice"}), ("UserName", {"name": "bob"})),
             say("Both on their way."))
    async with LLMService(_with_model(settings, llm), [load_net(APP)]), Session(nc) as s:
        message = await s.say("cancel alice and bob")
        reply = await s.answer(message)

    assert reply.text == "Both on their way."
    assert [m.marker.data for m in s.of(MarkerAdded)] == [{"name": "alice"}, {"name": "bob"}]
    assert all(m.cause == message.id and m.source == "llm" for m in s.of(MarkerAdded))


async def test_a_bad_tool_call_goes_back_with_its_error_and_the_correction_counts(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("cancel carol's order", call("UserName", nam="carol"), call("UserName", name="carol"), say("Done."))
    async with LLMService(_with_model(settings, llm), [load_net(APP)]), Session(nc) as s:
        reply = await s.answer(await s.say("cancel carol's order"))

    assert reply.text == "Done."
    assert [m.marker.data for m in s.of(MarkerAdded)] == [{"name": "carol"}]
    feedback = llm.requests_for("carol")[1].messages[-1]
    assert feedback["role"] == "tool" and feedback["tool_call_id"] == "call_0"
    assert "Error: invalid UserName: name: Field required" in feedback["content"]
    assert "ask the user instead of guessing" in feedback["content"]


async def test_a_call_that_stays_wrong_becomes_a_clear_message_to_the_user(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("cancel dave", call("UserName", '{"name": '))  # broken JSON, every time
    async with LLMService(_with_model(settings, llm, llm_max_corrections=2), [load_net(APP)]), Session(nc) as s:
        reply = await s.answer(await s.say("cancel dave"))

    assert len(llm.requests_for("cancel dave")) == 3  # the first try and two corrections
    assert isinstance(reply, AgentMessage)
    assert "I could not add UserName: the arguments are not valid JSON" in reply.text
    assert "Could you give me the missing or corrected details?" in reply.text
    assert s.of(MarkerAdded) == []


# -- context.prompt and context.remember ---------------------------------------------------------------------------


async def test_context_prompt_blocking_returns_the_models_answer_to_the_transition(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("my name is erin", say("Nice to meet you, erin."))
    llm.when("Who is the user?", say("The user is erin."))
    async with Stack(_with_model(settings, llm), [APP], parts=("scheduler", "executor", "llm")), \
            Session(nc) as s:
        await s.answer(await s.say("my name is erin"))
        await s.add("Question", text="Who is the user?")
        [asked] = await s.until(PromptRequest)
        [answered] = await s.until(PromptResponse)
        [done] = await s.until(TransitionCompleted, transition="ask_model")

    assert asked.wait and asked.transition == "ask_model" and asked.timeout == 60
    assert answered.request_id == asked.request_id and answered.cause == asked.id
    assert answered.text == "The user is erin." and answered.error is None
    assert done.outputs[0].data == {"text": "The user is erin."}
    # Blocking: not shown to the user, so not streamed, and no tools.
    assert not any(isinstance(e, AgentMessage) and e.cause == asked.id for _, e in s.events)
    [request] = llm.requests_for("Who is the user?")
    assert not request.body.get("stream") and "tools" not in request.body
    assert "ask_model, asks you this" in request.last_user and "the user does not see it" in request.last_user
    assert [m["content"] for m in request.messages[1:-1]] == ["my name is erin", "Nice to meet you, erin."]


async def test_context_prompt_non_blocking_returns_at_once_and_shows_the_answer(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("Greet the user warmly", say("Hello there, welcome back!"))
    async with Stack(_with_model(settings, llm), [APP], parts=("scheduler", "executor", "llm")), \
            Session(nc) as s:
        await s.add("Question", text="Greet the user warmly", wait=False)
        [done] = await s.until(TransitionCompleted, transition="ask_model")
        [asked] = await s.until(PromptRequest)
        [shown] = await s.until(AgentMessage, cause=asked.id)
        [answered] = await s.until(PromptResponse)

    assert done.outputs[0].data == {"text": "None"}  # returned at once, without the answer
    assert not asked.wait
    assert shown.text == "Hello there, welcome back!" and shown.firing_id is None
    assert answered.text == shown.text
    seqs = {e.id: seq for seq, e in s.events}
    assert seqs[shown.id] < seqs[answered.id]
    [request] = llm.requests_for("Greet the user warmly")
    assert request.body["stream"] is True and "your answer is shown to the user" in request.last_user


async def test_context_prompt_with_no_model_fails_the_transition_clearly(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [APP], parts=("scheduler", "executor", "llm")), Session(nc) as s:
        await s.add("Question", text="anything?")
        [answered] = await s.until(PromptResponse)
        [failed] = await s.until(TransitionFailed, final=True)

    assert answered.code == "llm_offline" and "OPENAI_API_KEY" in (answered.error or "")
    assert "context.prompt" in failed.error and "OPENAI_BASE_URL" in failed.error


async def test_context_prompt_nobody_answers_times_out_in_the_log_and_in_the_transition(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [APP], parts=("scheduler", "executor")), Session(nc) as s:  # no LLM service
        await s.add("Question", text="anyone there?", timeout=0.5)
        [asked] = await s.until(PromptRequest)
        [lapsed] = await s.until(PromptResponse)
        [failed] = await s.until(TransitionFailed, final=True)

    assert lapsed.request_id == asked.request_id and lapsed.cause == asked.id
    assert lapsed.code == "prompt_timeout" and lapsed.text == ""
    assert "no answer from the model within 0.5s" in failed.error and "petribus llm" in failed.error
    assert fold(s.events).marking()["Question"][0].data["text"] == "anyone there?"  # the marker came back


async def test_remember_adds_to_the_sessions_memory_through_the_log(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("cancel frank", call("UserName", name="frank"), say("Cancelling."))
    async with Stack(_with_model(settings, llm), [APP], parts=("scheduler", "executor", "llm")), \
            Session(nc) as s:
        await s.answer(await s.say("cancel frank"))
        [remembered] = await s.until(MemoryUpdated)
        [done] = await s.until(TransitionCompleted, transition="cancel_order")

    assert remembered.memory == {"cancelled": "frank"} and remembered.transition == "cancel_order"
    assert fold(s.events).memory == [{"cancelled": "frank"}]
    seqs = {e.id: seq for seq, e in s.events}
    assert seqs[remembered.id] < seqs[done.id]


# -- failures ----------------------------------------------------------------------------------------------------


async def test_rate_limits_and_5xx_are_retried_then_the_reply_lands(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    llm.when("hurry", fail(429, "slow down", retry_after="0"), fail(503, "overloaded"), say("Here you go."))
    async with LLMService(_with_model(settings, llm), [load_net(APP)]) as service, Session(nc) as s:
        reply = await s.answer(await s.say("hurry"))

    assert isinstance(reply, AgentMessage) and reply.text == "Here you go."
    assert [r.status for r in llm.requests_for("hurry")] == [429, 503, 200]
    assert s.of(ErrorEvent) == [] and service.stats["llm_errors"] == 0


async def test_a_bad_key_is_one_clear_error_event_and_the_session_stays_usable(
    settings: Settings, llm: ScriptedLLM, nc: Any, captured: io.StringIO
) -> None:
    wrong = "sk-wrong-key-9876543210zyxwvuWRONG"
    bad = settings.model_copy(update={"openai_api_key": SecretStr(wrong), "openai_base_url": llm.base_url})
    async with LLMService(bad, [load_net(APP)]), Session(nc) as s:
        first = await s.answer(await s.say("hello?"))
        helped = await s.answer(await s.say("/help"))
        again = await s.answer(await s.say("hello again"))

    assert isinstance(first, ErrorEvent) and first.code == "llm_auth"
    assert "refused the API key" in first.message and "OPENAI_API_KEY" in first.message
    assert [e.cause for e in s.of(ErrorEvent)].count(first.cause) == 1
    assert len(llm.requests_for("hello?")) == 1  # not retried
    assert isinstance(helped, AgentMessage) and "Cancels a user's order." in helped.text
    assert isinstance(again, ErrorEvent) and again.code == "llm_auth"
    # The endpoint echoed the key it got; it went nowhere.
    assert wrong in json.dumps(llm.requests[0].headers) and llm.requests[0].status == 401
    assert "model call failed" in captured.getvalue() and "AuthenticationError" in captured.getvalue()
    for secret in (wrong, wrong[-8:]):
        assert secret not in await _all_events(nc)
        assert secret not in captured.getvalue()


async def test_an_unknown_model_is_one_error_event_naming_what_to_check(
    settings: Settings, llm: ScriptedLLM, nc: Any
) -> None:
    async with LLMService(_with_model(settings, llm, llm_model="gpt-nope"), [load_net(APP)]), Session(nc) as s:
        error = await s.answer(await s.say("hello?"))

    assert isinstance(error, ErrorEvent) and error.code == "llm_model_not_found"
    assert "'gpt-nope'" in error.message and "PETRIBUS_LLM_MODEL" in error.message


# -- several processes, restarts ------------------------------------------------------------------------------------


async def test_two_llm_services_never_answer_one_message_twice(settings: Settings, llm: ScriptedLLM, nc: Any) -> None:
    net = load_net(APP)
    sessions = [f"s{i}" for i in range(3)]
    texts = [f"add user_{i:02d}" if i % 3 == 0 else f"message {i:02d}" for i in range(15)]
    for i, text in enumerate(texts):
        if text.startswith("add"):
            llm.when(text, call("UserName", name=f"user_{i:02d}"), say(f"added user_{i:02d}"))
    log = EventLog(nc)
    await log.append_many([SessionCreated(bot=BOT, session_id=sid) for sid in sessions])
    messages = [UserMessage(bot=BOT, session_id=sessions[i % 3], text=t) for i, t in enumerate(texts)]
    model = _with_model(settings, llm)
    async with LLMService(model, [net], instance="a"), LLMService(model, [net], instance="b"):
        async with Session(nc, "s0") as s0, Session(nc, "s1") as s1, Session(nc, "s2") as s2:
            await log.append_many(messages)
            for s in (s0, s1, s2):
                for m in messages:
                    if m.session_id == s.session_id:
                        await s.answer(m)

    for sid in sessions:
        sent = [m for m in messages if m.session_id == sid]
        events = [e for _, e in await log.read(BOT, sid)]
        replies = [e.reply_to for e in events if isinstance(e, AgentMessage) and e.reply_to]
        assert replies == [m.id for m in sent], "a message was answered twice, never, or out of order"
        markers = Counter(e.cause for e in events if isinstance(e, MarkerAdded))
        assert markers == Counter(m.id for m in sent if m.text.startswith("add"))
    # A process waits for the other's answer to an older message rather than asking the model again.
    assert {t: len(llm.requests_for(t)) for t in texts} == {t: 2 if t.startswith("add") else 1 for t in texts}


async def test_a_killed_llm_service_is_replaced_and_the_conversation_carries_on(
    settings: Settings, llm: ScriptedLLM, nc: Any, tmp_path: Path
) -> None:
    held = asyncio.Event()
    llm.when("my name is gina", say("Hello gina."))
    llm.when("what is my name?", say("Your name is gina."), hold=held)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": llm.base_url, "PETRIBUS_ACK_WAIT_S": "2"}
    stderr = tmp_path / "llm.log"
    petribus = str(Path(sys.executable).with_name("petribus"))
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([petribus, "llm", APP, "--nats-url", settings.nats_url, "--log-level", "debug"],
                                env=env, stdout=err, stderr=err)
    try:
        async with Session(nc) as s:
            first = await s.answer(await s.say("my name is gina"))
            second = await s.say("what is my name?")
            await llm.wait_for(lambda r: "what is my name?" in r.last_user)
            proc.send_signal(signal.SIGKILL)  # mid-answer: the message is not acked
            await asyncio.to_thread(proc.wait)
            held.set()
            async with LLMService(settings.model_copy(update={"openai_api_key": SecretStr(KEY),
                                                              "openai_base_url": llm.base_url}),
                                  [load_net(APP)], ack_wait_s=2.0, instance="after"):
                reply = await s.answer(second)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert first.text == "Hello gina." and reply.text == "Your name is gina."
    assert [e.reply_to for e in s.of(AgentMessage) if e.reply_to] == [s.of(UserMessage)[0].id, second.id]
    after = llm.requests_for("what is my name?")[-1]
    assert [m["content"] for m in after.messages[1:]] == ["my name is gina", "Hello gina.", "what is my name?"]
    assert KEY not in stderr.read_text()


# -- the prompt and the context budget (pure) ---------------------------------------------------------------------


def _conversation(turns: int) -> tuple[Any, Conversation]:
    net = load_net(APP)
    conv = Conversation(net)
    events: list[tuple[int, Any]] = [(1, SessionCreated(bot=BOT, session_id="s"))]
    for i in range(turns):
        events.append((len(events) + 1, UserMessage(bot=BOT, session_id="s", text=f"user turn {i} " + "x" * 80)))
        events.append((len(events) + 1, AgentMessage(bot=BOT, session_id="s", text=f"bot turn {i} " + "y" * 80,
                                                     reply_to=events[-1][1].id)))
    events.append((len(events) + 1, UserMessage(bot=BOT, session_id="s", text="the newest question")))
    conv.absorb(events)
    return net, conv


def test_the_system_prompt_forbids_inventing_data_and_names_only_exposed_parts() -> None:
    net, conv = _conversation(1)
    bob, audit = Marker(location="UserName", data={"name": "bob"}), Marker(location="AuditEntry",
                                                                           data={"secret_note": "n"})
    waiting = Marker(location="UserName", data={"name": "zoe"})
    at = conv.state.last_seq
    conv.absorb([
        (at + 1, MarkerAdded(bot=BOT, session_id="s", marker=bob)),
        (at + 2, MarkerAdded(bot=BOT, session_id="s", marker=audit, source="api")),
        (at + 3, TransitionFired(bot=BOT, session_id="s", firing_id="f1", transition="cancel_order",
                                 consumed=[bob.id])),
        (at + 4, TransitionFired(bot=BOT, session_id="s", firing_id="f2", transition="file_audit",
                                 consumed=[audit.id])),
        (at + 5, MarkerAdded(bot=BOT, session_id="s", marker=waiting)),
    ])
    text = prompt.system_prompt(net, conv, budget=48_000, before=10**9)
    assert "Transitions in flight: cancel_order (starting)" in text
    assert 'Markers waiting:\n  - UserName {"name": "zoe"}' in text
    assert 'the user added UserName {"name": "bob"}' in text
    assert "Never invent data the user did not give" in text
    assert "ask the user for it instead of calling a tool" in text
    for shown in ("UserName", "name: string (required)", "cancel_order: Cancels a user's order.",
                  "ask_model: Asks the model a question.", "A bot to cancel customers' orders."):
        assert shown in text
    assert not any(h in text for h in HIDDEN)
    assert [t["function"]["name"] for t in for_net(net)] == ["UserName", "OrderStatus", "Question", "Answer"]


def test_a_long_conversation_keeps_the_newest_turns_within_the_budget() -> None:
    net, conv = _conversation(200)
    [last] = list(conv.unanswered.values())
    ask = Ask(last.id, last.text, conv.seq_of(last.id))
    budget = 8_000
    messages = prompt.messages(net, conv, ask, budget=budget)

    assert prompt.size(messages) <= budget
    assert messages[-1] == {"role": "user", "content": "the newest question"}
    assert messages[-2]["content"].startswith("bot turn 199") and messages[-3]["content"].startswith("user turn 199")
    history = conv.history(ask.seq)
    kept = len(messages) - 2
    assert 10 < kept < len(history)
    assert [m["content"] for m in messages[1:-1]] == [t.text for t in history[-kept:]]  # the newest ones
    assert f"Earlier conversation: {len(history) - kept} older message(s) are left out" in messages[0]["content"]
    assert "user turn " in messages[0]["content"].split("Earlier conversation:")[1]  # a trace of them
    # With room for everything, nothing is dropped.
    everything = prompt.messages(net, conv, ask, budget=10**7)
    assert len(everything) == len(history) + 2 and "Earlier conversation" not in everything[0]["content"]


async def test_a_bots_own_api_key_and_base_url_are_used_and_never_shown(
    settings: Settings, nc: Any, captured: io.StringIO, monkeypatch: Any
) -> None:
    """Beam apps pass ``Bot(api_key=..., base_url=...)``: that bot's calls go there with that key, though
    the environment names no model endpoint at all, and the key appears in no event, log or API answer."""
    own_key = "sk-own-bot-key-0123456789SECRET"
    async with ScriptedLLM(key=own_key) as own:
        own.when("hello", say("Hi from the bot's own endpoint."))
        monkeypatch.setenv("BOT_OWN_KEY", own_key)
        monkeypatch.setenv("BOT_OWN_URL", own.base_url)
        assert settings.openai_api_key is None and not settings.openai_base_url
        async with Stack(settings, [app("llm_own_key")]) as stack:
            client = await Client.connect(stack.ws_url("own_key"))
            try:
                session_id = (await client.recv())["value"]
                await client.send({"type": "user_message", "value": "hello", "request_id": "r1"})
                reply = await client.until(lambda e: e["type"] == "agent_message"
                                           and e["metadata"]["request_id"] == "r1")
            finally:
                await client.close()
            async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
                shown = (await http.get("/bots")).text + (await http.get(f"/bots/own_key/sessions/{session_id}")).text
    assert reply["value"] == "Hi from the bot's own endpoint."
    [request] = own.requests
    assert request.headers["authorization"] == f"Bearer {own_key}" and request.status == 200
    stored = "\n".join(e.model_dump_json() for _, e in await EventLog(nc).read("own_key", session_id))
    for where in (stored, shown, captured.getvalue(), repr(load_net(app("llm_own_key")))):
        assert own_key not in where and own_key[:12] not in where
