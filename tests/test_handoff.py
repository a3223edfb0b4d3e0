"""Hand-offs between bots (docs/handoffs.md): ``Bot(handoffs=[...])`` gives the model a tool per target;
calling it appends ``handed_off`` in the source session and opens a linked session of the target bot,
owned by the same owner, whose model answers the request. Real nats-server, real HTTP to a scripted model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from petribus import Bot, BotLocation, Handoff, keys
from petribus.bus import EventLog
from petribus.core import fold
from petribus.errors import NetDefinitionError, UnknownHandoff
from petribus.events import (
    Actor,
    AgentMessage,
    HandedOff,
    MarkerAdded,
    SessionCreated,
    UserMessage,
)
from petribus.loader import load_net
from petribus.settings import Settings
from petribus_llm.app import LLMService, handoff_ids
from petribus_llm.conversation import Conversation
from petribus_llm.tools import for_net
from pydantic import BaseModel, SecretStr

from .conftest import app
from .harness import Client, Stack
from .scripted_llm import ScriptedLLM, call, say

SUPPORT, BILLING = "handoff_support", "handoff_billing"
APPS = [app(SUPPORT), app(BILLING)]
TOOL = f"transfer_to_{BILLING}"
KEY = "sk-handoff-test"
ASKED = "I want my money back for order 42"
REQUEST = "Refund for order 42"


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM(key=KEY) as server:
        server.when(ASKED, call(TOOL, request=REQUEST), say("I handed you over to billing."))
        server.when(REQUEST, call("Refund", order="42"), say("Refund started for order 42."))
        yield server


def _with_model(settings: Settings, llm: ScriptedLLM) -> Settings:
    return settings.model_copy(update={"openai_api_key": SecretStr(KEY), "openai_base_url": llm.base_url})


async def _events(nc: Any, bot: str, session_id: str) -> list[tuple[int, Any]]:
    return await EventLog(nc).read(bot, session_id)


def test_a_bot_names_its_handoffs_and_its_model_gets_a_tool_for_each() -> None:
    support = load_net(app(SUPPORT))
    assert support.handoffs == (Handoff(bot=BILLING, description="refunds and invoices"),)
    tools = {t["function"]["name"]: t["function"] for t in for_net(support)}
    assert set(tools) == {"Ticket", TOOL}
    assert "refunds and invoices" in tools[TOOL]["description"]
    assert tools[TOOL]["parameters"]["required"] == ["request"]
    assert for_net(load_net(app(BILLING))) and all(  # a bot that names none gets no hand-off tool
        not t["function"]["name"].startswith("transfer_to_") for t in for_net(load_net(app(BILLING))))


def test_a_badly_named_handoff_is_refused_with_every_problem() -> None:
    class Note(BaseModel):
        text: str

    with pytest.raises(NetDefinitionError) as info:
        Bot(name="desk", locations=[BotLocation(marker=Note)], handoffs=["desk", "billing", "billing", "no.dots",
                                                                         Handoff(bot="x" * 60), 42]).net()
    problems = "\n".join(info.value.problems)
    assert "'desk' cannot hand over to itself" in problems
    assert "'billing' is named twice" in problems
    assert "'no.dots' is not a bot name" in problems and "1-52 characters" in problems
    assert "handoffs[5] is 42" in problems
    assert len(info.value.problems) == 5


async def test_a_handoff_to_a_bot_this_deployment_does_not_serve_is_refused_at_start(settings) -> None:
    from petribus_gateway.app import Gateway

    support = load_net(app(SUPPORT))
    counter = load_net(app("counter"))
    with pytest.raises(UnknownHandoff) as info:
        LLMService(settings, [support, counter])
    assert info.value.code == "unknown_handoff"
    assert f"bot {SUPPORT!r} hands over to {BILLING!r}, which this deployment does not serve" in str(info.value)
    assert f"it serves counter, {SUPPORT}" in str(info.value)

    gateway = Gateway(settings, [support, counter])
    with pytest.raises(UnknownHandoff, match=BILLING):
        await gateway.start()
    LLMService(settings, [support, load_net(app(BILLING))])  # with the target served, it starts


async def test_the_model_hands_over_and_the_new_session_is_linked_owned_alike_and_answered(
        settings, nc, llm) -> None:
    from petribus.client import Client as PbClient
    from petribus.client import NotFound

    alice, alice_key = await keys.create(nc.jetstream(), "alice")
    bob, _ = await keys.create(nc.jetstream(), "bob")
    async with Stack(_with_model(settings, llm), APPS) as stack:
        ws = Client(await websockets.connect(stack.ws_url(SUPPORT), additional_headers={
            "Authorization": f"Bearer {alice}"}))
        created = await ws.until("session_created")
        source = created["value"]
        await ws.send({"type": "user_message", "value": ASKED, "request_id": "r1"})
        told = await ws.until("handed_off")
        reply = await ws.until(lambda e: e["type"] == "agent_message" and e["metadata"]["request_id"] == "r1")
        await ws.close()

        # The client of the first session is told where the conversation goes on.
        target = told["value"]["session_id"]
        assert told["value"] == {"bot": BILLING, "session_id": target, "request": REQUEST,
                                 "path": f"/bots/{BILLING}/sessions/{target}",
                                 "ws": f"/bots/{BILLING}/ws?session_id={target}"}
        assert told["metadata"]["request_id"] == "r1"
        assert told["metadata"]["actor"]["owner"] == "alice"
        assert told["metadata"]["actor"]["key_id"] == alice_key.key_id
        assert reply["value"] == "I handed you over to billing."

        async with PbClient(stack.gateway.url, token=alice) as client:
            followed = await client.session(SUPPORT, source).follow_handoff()
            assert (followed.bot, followed.session_id) == (BILLING, target)
            # The target bot's model answers the handed-over request, and what it adds runs there.
            result = await followed.run(halt_after=["refund"], since=0, timeout=30)
            state = await result.state()
        async with PbClient(stack.gateway.url, token=bob) as other:  # another owner cannot see it
            with pytest.raises(NotFound):
                await other.session(BILLING, target).state()

        answered = await llm.wait_for(lambda r: r.last_user == REQUEST)
        assert TOOL not in answered.tool_names  # billing hands over to nobody
        assert f"{SUPPORT} handed this conversation over to you" in answered.system
        assert TOOL in llm.requests_for(ASKED)[0].tool_names

    # Both logs link each other: the source's handed_off names the target; the target's opening names it.
    src = await _events(nc, SUPPORT, source)
    [(handed_seq, handed)] = [(s, e) for s, e in src if isinstance(e, HandedOff)]
    [(asked_seq, asked)] = [(s, e) for s, e in src if isinstance(e, UserMessage)]
    assert (handed.target_bot, handed.target_session, handed.cause) == (BILLING, target, asked.id)
    dst = await _events(nc, BILLING, target)
    opening, first = dst[0][1], dst[1][1]
    assert isinstance(opening, SessionCreated) and opening.parent is not None
    assert (opening.parent.bot, opening.parent.session_id, opening.parent.seq, opening.parent.handoff_id) == \
        (SUPPORT, source, asked_seq, handed.id)
    assert dst[0][0] < handed_seq, "the target is open before the client is told to follow it"
    assert isinstance(first, UserMessage) and first.text == REQUEST and first.cause == handed.id
    assert not any(isinstance(e, AgentMessage) and e.text == "Billing here." for _, e in dst), \
        "a handed-over session starts with the request, not the welcome"
    # The audit trail spans both: the same owner and key caused the hand-off and opened the target.
    for event in (handed, opening, first):
        assert event.actor is not None and (event.actor.owner, event.actor.key_id) == ("alice", alice_key.key_id)
    folded = fold(dst)
    assert folded.owner == "alice" and folded.handed_from == (SUPPORT, source, asked_seq)
    assert state.data("Refunded") == [{"order": "42"}]
    assert any(isinstance(e, MarkerAdded) and e.source == "llm" and e.marker.data == {"order": "42"}
               for _, e in dst)
    assert result.event.transition == "refund"


async def test_a_retried_handoff_finishes_the_first_and_makes_no_second_session(settings, nc, llm) -> None:
    """A process that died between opening the target and saying so in the source: the message is answered
    again, the open session is found and announced, and the model calling the tool again opens no other."""
    log = EventLog(nc)
    source = "retried"
    who = Actor(owner="alice", key_id="k1", address="10.0.0.9")
    await log.append(SessionCreated(bot=SUPPORT, session_id=source, actor=who))
    asked = UserMessage(bot=SUPPORT, session_id=source, text=ASKED, actor=who, request_id="r9")
    event_id, target = handoff_ids(SUPPORT, source, asked.id, BILLING)
    # What the earlier try did before it died: the target session, opened; no handed_off yet.
    service = LLMService(settings, [load_net(a) for a in APPS])
    conv = Conversation(service.nets[SUPPORT])
    asked_seq = await log.append(asked)
    conv.absorb(await log.read(SUPPORT, source))
    earlier = HandedOff(id=event_id, bot=SUPPORT, session_id=source, cause=asked.id, actor=who, request_id="r9",
                        target_bot=BILLING, target_session=target, request=REQUEST)
    service.events = log
    await service._open_target(conv, asked, earlier)
    opened = await log.last_seq(BILLING, target)
    assert opened > 0
    await service._open_target(conv, asked, earlier)  # opening it again (a retry past the duplicate window)
    assert await log.last_seq(BILLING, target) == opened, "a second open appended to the target"

    async with Stack(_with_model(settings, llm), APPS, parts=("llm",)):
        found = await log.wait_for(SUPPORT, source, after=asked_seq, timeout=30,
                                   match=lambda e: isinstance(e, AgentMessage) and e.reply_to == asked.id)
        assert found is not None
        assert await log.wait_for(BILLING, target, after=0, timeout=30,
                                  match=lambda e: isinstance(e, AgentMessage)) is not None

    assert len(llm.requests_for(ASKED)) == 2, "the model was asked again, called the tool again, then replied"
    src = await _events(nc, SUPPORT, source)
    assert [(e.id, e.target_session, e.request) for _, e in src if isinstance(e, HandedOff)] == \
        [(event_id, target, REQUEST)]
    assert list(await log.sessions(BILLING)) == [target]
    dst = await _events(nc, BILLING, target)
    assert [type(e).__name__ for _, e in dst][:2] == ["SessionCreated", "UserMessage"]
    assert sum(isinstance(e, SessionCreated) for _, e in dst) == 1
    assert sum(isinstance(e, UserMessage) for _, e in dst) == 1
    assert dst[0][1].parent.seq == asked_seq  # type: ignore[union-attr]
    assert dst[0][1].actor == who


async def test_the_terminal_chat_says_who_took_over_and_follows_there(settings, llm, tmp_path) -> None:
    from petribus.chat import Chat
    from rich.console import Console

    from .test_chat import Screen, Typist

    screen, typist = Screen(), Typist()
    async with Stack(_with_model(settings, llm), APPS) as stack:
        console = Console(file=screen, width=300, soft_wrap=True, markup=False, emoji=False, highlight=False)
        chat = Chat(stack.gateway.url.replace("http://", "ws://"), SUPPORT, console=console,
                    download_dir=tmp_path / "downloads")
        running = asyncio.create_task(chat.run(typist.lines()))
        await screen.shows("[session_created]")
        source = chat.session_id
        typist.type(ASKED)
        await screen.shows(f"[handed_off] the conversation was handed over to {BILLING}")
        await screen.shows(f"[following] {BILLING} session ")
        await screen.shows(f"(handed over by {SUPPORT}, session {source})")
        await screen.shows("🤖 Refund started for order 42.")
        await screen.shows("[transition_completed] refund")
        typist.type("/quit")
        followed = await running
    assert chat.bot == BILLING and followed is not None and followed != source


async def test_handoff_on_a_closed_bus_needs_nothing_the_llm_role_may_not_do(llm, tmp_path) -> None:
    from petribus.bus_auth import Credentials
    from petribus.embedded import NatsServer, free_ports

    from .test_bus_auth import _violations

    credentials = Credentials.load_or_create(tmp_path / "auth")
    [http_port] = free_ports(1)
    server = NatsServer(tmp_path / "nats", auth=credentials, http_port=http_port).start()
    try:
        settings = Settings(nats_url=server.url, nats_auth_dir=credentials.folder, data_dir=tmp_path / "data",
                            port=0, workers=2, ack_wait_s=30.0)
        async with Stack(_with_model(settings, llm), APPS) as stack:
            ws = await Client.connect(stack.ws_url(SUPPORT))
            await ws.until("session_created")
            await ws.send({"type": "user_message", "value": ASKED})
            told = await ws.until("handed_off")
            await ws.close()
            async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
                target = told["value"]["session_id"]
                follow = await Client.connect(stack.ws_url(BILLING, session_id=target))
                await follow.until(lambda e: e["type"] == "transition_completed")
                await follow.close()
                body = (await http.get(told["value"]["path"])).json()
        assert body["events"][0]["metadata"]["parent"]["session_id"] == told["metadata"]["session_id"]
        assert _violations(server) == [], "the hand-off did something a role may not"
    finally:
        server.stop()

