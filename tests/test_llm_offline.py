"""The LLM service with no model: commands become validated markers, anything else gets a description."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import AgentMessage, MarkerAdded, SessionCreated, UserMessage, decode
from petribus.loader import load_net
from petribus_llm.app import LLMService

from .conftest import app

EXAMPLES = Path(__file__).parent.parent / "examples"
ORDER_BOT = f"{EXAMPLES / 'order_bot.py'}:bot"
PARALLEL_SEARCH = f"{EXAMPLES / 'parallel_search.py'}:bot"


async def _wait_for_replies(nc, bot: str, want: set[str], timeout: float = 30.0) -> None:
    """Read the bot's sessions from the start (an ordered consumer: nothing slips between a read and a
    subscription) until each user message id in ``want`` has a reply."""
    got: set[str] = set()
    done = asyncio.Event()

    async def on_msg(msg) -> None:
        event = decode(msg.data)
        if isinstance(event, AgentMessage) and event.reply_to:
            got.add(event.reply_to)
            if want <= got:
                done.set()

    sub = await nc.jetstream().subscribe(subjects.bot_events(bot), stream=subjects.EVENTS_STREAM,
                                         ordered_consumer=True, cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()


async def _say(nc, bot: str, session_id: str, *texts: str) -> list[UserMessage]:
    """Open the session (once) and append ``texts`` as user messages, in order."""
    log = EventLog(nc)
    if await log.last_seq(bot, session_id) == 0:
        await log.append(SessionCreated(bot=bot, session_id=session_id))
    messages = [UserMessage(bot=bot, session_id=session_id, text=t) for t in texts]
    for m in messages:
        await log.append(m)
    return messages


def _replies(events) -> dict[str, list[AgentMessage]]:
    out: dict[str, list[AgentMessage]] = {}
    for _, e in events:
        if isinstance(e, AgentMessage) and e.reply_to:
            out.setdefault(e.reply_to, []).append(e)
    return out


async def test_add_command_becomes_a_validated_marker_from_the_llm(settings, nc):
    net = load_net(ORDER_BOT)
    async with LLMService(settings, [net]):
        [msg] = await _say(nc, net.bot, "s1", '/add UserName {"name": "alice"}')
        await _wait_for_replies(nc, net.bot, {msg.id})

    events = await EventLog(nc).read(net.bot, "s1")
    added = [e for _, e in events if isinstance(e, MarkerAdded)]
    assert len(added) == 1
    assert added[0].source == "llm" and added[0].cause == msg.id
    assert added[0].marker.location == "UserName" and added[0].marker.data == {"name": "alice"}
    [reply] = _replies(events)[msg.id]
    assert reply.cause == msg.id and "Added UserName" in reply.text
    # The marker is in the log before the reply that confirms it.
    seqs = {e.id: s for s, e in events}
    assert seqs[added[0].id] < seqs[reply.id]
    assert [m.data for m in fold(events).marking()["UserName"]] == [{"name": "alice"}]


async def test_added_marker_keeps_real_types_and_defaults(settings, nc):
    net = load_net(app("counter"))
    async with LLMService(settings, [net]):
        [msg] = await _say(nc, net.bot, "s1", '/add Item {"n": 7}')
        await _wait_for_replies(nc, net.bot, {msg.id})

    [item] = fold(await EventLog(nc).read(net.bot, "s1")).marking()["Item"]
    assert item.data == {"n": 7, "sleep": 0.0}
    assert type(item.data["n"]) is int and type(item.data["sleep"]) is float


async def test_plain_message_lists_exposed_locations_and_fields_only(settings, nc):
    net = load_net(PARALLEL_SEARCH)
    async with LLMService(settings, [net]):
        [msg] = await _say(nc, net.bot, "s1", "hi, what can you do?")
        await _wait_for_replies(nc, net.bot, {msg.id})

    events = await EventLog(nc).read(net.bot, "s1")
    [reply] = _replies(events)[msg.id]
    text = reply.text
    assert net.description in text
    for exposed in ("Query", "Summary", "text: string", "sources: integer", "fan_out", "summarise"):
        assert exposed in text, f"{exposed!r} missing from:\n{text}"
    for hidden in ("WebQuery", "DocsQuery", "WebResult", "DocsResult", "hits"):
        assert hidden not in text, f"unexposed {hidden!r} offered in:\n{text}"
    assert '/add Query {"text": "..."}' in text
    assert not any(isinstance(e, MarkerAdded) for _, e in events)


async def test_bad_add_commands_explain_and_add_nothing(settings, nc):
    net = load_net(PARALLEL_SEARCH)
    bad = {
        '/add Nope {"text": "x"}': "no such location",
        '/add WebQuery {"text": "x"}': "no such location",  # exists, but expose=False
        "/add Query {text: x}": "not valid JSON",
        '/add Query {"text": ["not", "a", "string"]}': "valid string",
        "/add Query": "as a JSON object",
        "/add": "needs a location",
        "/frobnicate": "don't know the command",
    }
    async with LLMService(settings, [net]):
        messages = await _say(nc, net.bot, "s1", *bad)
        await _wait_for_replies(nc, net.bot, {m.id for m in messages})

    events = await EventLog(nc).read(net.bot, "s1")
    replies = _replies(events)
    for m, expected in zip(messages, bad.values(), strict=True):
        [reply] = replies[m.id]
        assert expected in reply.text, f"{m.text!r} got:\n{reply.text}"
        assert "/add Query" in reply.text, f"{m.text!r}: the reply should show what to type instead"
    assert not any(isinstance(e, MarkerAdded) for _, e in events)
    assert fold(events).marking() == {}


async def test_two_services_answer_each_message_exactly_once_and_in_order(settings, nc):
    net = load_net(ORDER_BOT)
    sessions = [f"s{i}" for i in range(3)]  # 3, not 2 or 4: the two services alternate deliveries
    log = EventLog(nc)
    await log.append_many([SessionCreated(bot=net.bot, session_id=sid) for sid in sessions])
    messages = [
        UserMessage(bot=net.bot, session_id=sessions[i % len(sessions)],
                    text=f'/add UserName {{"name": "user{i}"}}' if i % 2 else f"message {i}")
        for i in range(20)
    ]
    async with LLMService(settings, [net], instance="a"), LLMService(settings, [net], instance="b"):
        # One burst, so both services hold messages of the same sessions at the same time.
        await log.append_many(messages)
        await _wait_for_replies(nc, net.bot, {m.id for m in messages})

    for sid in sessions:
        sent = [m for m in messages if m.session_id == sid]
        events = await log.read(net.bot, sid)
        replies = [e.reply_to for _, e in events if isinstance(e, AgentMessage) and e.reply_to]
        assert Counter(replies) == Counter(m.id for m in sent), "a message was answered twice or never"
        assert replies == [m.id for m in sent], "replies are out of the session's order"
        markers = [e.cause for _, e in events if isinstance(e, MarkerAdded)]
        assert Counter(markers) == Counter(m.id for m in sent if m.text.startswith("/add"))


async def test_replayed_messages_are_not_answered_again(settings, nc):
    net = load_net(ORDER_BOT)
    async with LLMService(settings, [net]):
        old = await _say(nc, net.bot, "s1", "hello", '/add UserName {"name": "bob"}', "/help")
        await _wait_for_replies(nc, net.bot, {m.id for m in old})

    # A new consumer delivers the whole history again: only the log can tell what was answered.
    await nc.jetstream().delete_consumer(subjects.EVENTS_STREAM, subjects.LLM_DURABLE)
    async with LLMService(settings, [net]) as again:
        [new] = await _say(nc, net.bot, "s1", "and now?")
        await _wait_for_replies(nc, net.bot, {new.id})
    stats = again.stats  # read after stop(): it drains the message in hand

    events = await EventLog(nc).read(net.bot, "s1")
    replies = _replies(events)
    assert {k: len(v) for k, v in replies.items()} == {m.id: 1 for m in [*old, new]}
    assert sum(isinstance(e, MarkerAdded) for _, e in events) == 1
    assert stats["already_answered"] == len(old) and stats["answered"] == 1


async def test_the_server_sends_the_service_only_user_messages_and_prompts(settings, nc):
    """The durable is filtered by kind on the server: the markers, firings and replies of a session are
    never delivered to the LLM service. A durable made by an older version over every event is narrowed in
    place."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    net = load_net(ORDER_BOT)
    js = nc.jetstream()
    await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(  # as the service made it before
        durable_name=subjects.LLM_DURABLE, filter_subject=subjects.all_events(), ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_ack_pending=20_000, max_deliver=-1))
    async with LLMService(settings, [net]):
        said = await _say(nc, net.bot, "f1", '/add UserName {"name": "ann"}', "hello")
        await _wait_for_replies(nc, net.bot, {m.id for m in said})
        info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.LLM_DURABLE)
    events = await EventLog(nc).read(net.bot, "f1")
    kinds = Counter(e.type for _, e in events)
    assert kinds["marker_added"] == 1 and kinds["agent_message"] >= 2  # other kinds were appended ...
    assert info.config.filter_subjects == subjects.kinds("user_message", "prompt_request")
    assert info.delivered.consumer_seq == kinds["user_message"] + kinds["prompt_request"] == 2  # ... not sent
    assert info.num_ack_pending == 0 and info.num_pending == 0
