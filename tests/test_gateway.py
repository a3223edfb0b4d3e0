"""The gateway against a real nats-server: WebSocket sessions streamed from the log, client input
validated before it may enter the log, and the REST API read from the log."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from pydantic import BaseModel

from petribus import Bot, BotLocation, bus
from petribus.bus import EventLog
from petribus.errors import PetribusError
from petribus.events import Marker, MarkerAdded, UserMessage
from petribus.settings import Settings
from petribus_gateway.app import Gateway, create_app
from petribus_gateway.context import GatewayContext

from .conftest import app
from .harness import Client, Stack

COUNTER = app("counter")
MAX_MESSAGE = 4096


class Name(BaseModel):
    name: str


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    # No executor: a firing stays claimed (in flight), which is what these tests look at.
    small = settings.model_copy(update={"gateway_max_message_bytes": MAX_MESSAGE})
    async with Stack(small, [COUNTER], parts=("scheduler", "gateway")) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as client:
        yield client


async def _new_session(stack: Stack) -> tuple[Client, str, int]:
    client = await Client.connect(stack.ws_url("counter"))
    first = await client.recv()
    assert first["type"] == "session_created"
    return client, first["value"], first["metadata"]["seq"]


def _marker(location: str, **data: Any) -> dict[str, Any]:
    return {"type": "marker_added", "value": {"location": location, "data": data}}


async def _log_seqs(nc: Any, session_id: str, after: int = 0) -> list[int]:
    return [seq for seq, _ in await EventLog(nc).read("counter", session_id, after=after)]


async def _expect_closed(client: Client, code: int) -> str:
    """Wait for the server to close the socket with ``code``; return its reason."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    return closed.value.rcvd.reason


async def test_new_session_starts_with_session_created_and_streams_what_the_client_adds(
    stack: Stack, nc
) -> None:
    client, session_id, created_seq = await _new_session(stack)
    try:
        assert client.events[0]["metadata"]["session_id"] == session_id
        log = await EventLog(nc).read("counter", session_id)
        assert [(seq, ev.type) for seq, ev in log] == [(created_seq, "session_created")]

        await client.send({**_marker("Item", n=3), "request_id": "r1"})
        added = await client.until("marker_added")
        assert added["value"]["location"] == "Item"
        assert added["value"]["data"] == {"n": 3, "sleep": 0.0}
        assert type(added["value"]["data"]["n"]) is int and type(added["value"]["data"]["sleep"]) is float
        assert added["metadata"]["request_id"] == "r1"

        fired = await client.until("transition_fired")
        assert fired["value"] == {"transition": "work", "consumed": [added["value"]["id"]]}
        assert fired["metadata"]["transition_name"] == "work" and fired["metadata"]["task_id"]
        assert fired["metadata"]["seq"] > added["metadata"]["seq"] > created_seq

        stored = {seq: ev for seq, ev in await EventLog(nc).read("counter", session_id)}
        assert isinstance(stored[added["metadata"]["seq"]], MarkerAdded)
        assert stored[added["metadata"]["seq"]].source == "user"
    finally:
        await client.close()


async def test_a_new_session_opens_with_the_bots_welcome_message(settings: Settings) -> None:
    greeter = Bot(name="greeter", welcome_message="Hello! Who are you?", locations=[BotLocation(marker=Name)])

    @greeter.transition(inputs={Name: 1})
    def noop(inputs: Any) -> dict:
        return {}

    async with Gateway(settings, [greeter.net()]) as gateway:
        client = await Client.connect(gateway.url.replace("http://", "ws://") + "/bots/greeter/ws")
        try:
            created, welcome = await client.recv(), await client.recv()
        finally:
            await client.close()
    assert created["type"] == "session_created"
    assert welcome["type"] == "agent_message" and welcome["value"] == "Hello! Who are you?"
    assert welcome["metadata"]["seq"] == created["metadata"]["seq"] + 1


async def test_reconnect_with_since_receives_every_later_event_exactly_once(stack: Stack, nc) -> None:
    first, session_id, _ = await _new_session(stack)
    await first.send(_marker("Left", v=1))
    seen = (await first.until("marker_added"))["metadata"]["seq"]
    await first.close()

    # While the client is away: a user message, and a Right that lets the scheduler fire the join.
    events = EventLog(nc)
    await events.append(UserMessage(bot="counter", session_id=session_id, text="while away"))
    await events.append(MarkerAdded(bot="counter", session_id=session_id,
                                    marker=Marker(location="Right", data={"v": 2})))

    again = await Client.connect(stack.ws_url("counter", session_id=session_id, since=seen))
    try:
        await again.until("transition_fired")
        await again.send({"type": "user_message", "value": "back again"})
        last = await again.until(lambda e: e["type"] == "user_message" and e["value"] == "back again")

        received = [e["metadata"]["seq"] for e in again.events]
        in_log = [s for s in await _log_seqs(nc, session_id, after=seen) if s <= last["metadata"]["seq"]]
        assert received == in_log
        assert [e["type"] for e in again.events] == ["user_message", "marker_added", "transition_fired",
                                                     "user_message"]
        assert all(e["metadata"]["session_id"] == session_id for e in again.events)
    finally:
        await again.close()


async def test_resuming_in_the_middle_of_a_burst_loses_and_repeats_nothing(stack: Stack, nc) -> None:
    first, session_id, _ = await _new_session(stack)
    events = EventLog(nc)

    async def burst() -> list[int]:
        return [await events.append(UserMessage(bot="counter", session_id=session_id, text=f"m{i}"))
                for i in range(100)]

    appending = asyncio.create_task(burst())
    try:
        while len(first.events) < 20:
            await first.recv()
        await first.close()
        resumed = await Client.connect(stack.ws_url("counter", session_id=session_id,
                                                    since=first.events[-1]["metadata"]["seq"]))
        try:
            last = (await appending)[-1]
            await resumed.until(lambda e: e["metadata"]["seq"] == last)
        finally:
            await resumed.close()
    finally:
        await appending

    received = [e["metadata"]["seq"] for e in first.events + resumed.events]
    assert received == await _log_seqs(nc, session_id)


async def test_a_restarted_gateway_resumes_sessions_from_the_log(stack: Stack, nc) -> None:
    client, session_id, _ = await _new_session(stack)
    await client.send(_marker("Left", v=1))
    seen = (await client.until("marker_added"))["metadata"]["seq"]

    await stack.gateway.stop()
    await _expect_closed(client, 1012)  # "service restart": come back later
    await EventLog(nc).append(UserMessage(bot="counter", session_id=session_id, text="while restarting"))

    async with Gateway(stack.settings, stack.nets) as gateway:
        base = gateway.url.replace("http://", "ws://")
        again = await Client.connect(f"{base}/bots/counter/ws?session_id={session_id}&since={seen}")
        try:
            assert (await again.recv())["value"] == "while restarting"
        finally:
            await again.close()


async def test_reconnect_without_since_replays_the_whole_session(stack: Stack, nc) -> None:
    first, session_id, created_seq = await _new_session(stack)
    await first.send(_marker("Left", v=5))
    await first.until("marker_added")
    await first.close()

    again = await Client.connect(stack.ws_url("counter", session_id=session_id))
    try:
        assert (await again.recv())["type"] == "session_created"
        assert (await again.recv())["value"]["data"] == {"v": 5}
        assert [e["metadata"]["seq"] for e in again.events] == await _log_seqs(nc, session_id)
    finally:
        await again.close()


async def test_unknown_bot_and_unknown_session_are_refused_with_4404(stack: Stack) -> None:
    client = await Client.connect(stack.ws_url("nobot"))
    error = await client.recv()
    assert error["type"] == "error" and error["value"]["code"] == "unknown_bot"
    assert "'nobot'" in error["value"]["message"] and "counter" in error["value"]["message"]
    assert "nobot" in await _expect_closed(client, 4404)

    client = await Client.connect(stack.ws_url("counter", session_id="nosuchsession", since=3))
    error = await client.recv()
    assert error["type"] == "error" and error["value"]["code"] == "unknown_session"
    assert "'nosuchsession'" in error["value"]["message"]
    assert error["metadata"]["session_id"] == "nosuchsession"
    await _expect_closed(client, 4404)

    client = await Client.connect(stack.ws_url("counter", session_id="a.b"))
    assert (await client.recv())["value"]["code"] == "invalid_session_id"
    await _expect_closed(client, 4400)


BAD_INPUTS: list[tuple[str, Any, str, str]] = [
    # (what, sent, error code, text the message must contain)
    ("not JSON", "hello there", "invalid_json", "'hello there'"),
    ("JSON but not an object", "[1, 2]", "not_an_object", "[1, 2]"),
    ("unknown type", {"type": "dance", "value": 1}, "unknown_type", "'dance'"),
    ("no type", {"value": "hi"}, "unknown_type", "no 'type'"),
    ("unknown field", {"type": "user_message", "value": "hi", "extra": 1}, "unknown_field", "'extra'"),
    ("unknown location", _marker("Nowhere", n=1), "unknown_location", "'Nowhere'"),
    ("location not exposed", _marker("Done", n=1), "unknown_location", "'Done'"),
    ("data missing a field", _marker("Item", sleep=1), "invalid_input", "n: Field required"),
    ("data of the wrong type", _marker("Item", n="three"), "invalid_input",
     "n: Input should be a valid integer"),
    ("marker value of the wrong shape", {"type": "marker_added", "value": ["Item", {"n": 1}]},
     "invalid_value", "'marker_added' needs a value"),
    ("marker data not an object", {"type": "marker_added", "value": {"location": "Item", "data": [1]}},
     "invalid_input", "must be a JSON object"),
    ("user message that is not text", {"type": "user_message", "value": {"text": "hi"}},
     "invalid_value", "got an object"),
    ("user message without a value", {"type": "user_message"}, "invalid_value", "got no value"),
    ("binary frame that is not UTF-8", b"\xff\xfe{}", "invalid_utf8", "not UTF-8"),
    ("message over the size limit", "x" * (MAX_MESSAGE + 1), "message_too_large", f"{MAX_MESSAGE + 1} bytes"),
]


async def test_bad_input_gets_an_error_to_its_sender_only_and_never_enters_the_log(stack: Stack, nc) -> None:
    sender, session_id, _ = await _new_session(stack)
    watcher = await Client.connect(stack.ws_url("counter", session_id=session_id))
    try:
        await watcher.recv()
        before = await _log_seqs(nc, session_id)

        for what, sent, code, text in BAD_INPUTS:
            if isinstance(sent, bytes):
                await sender.ws.send(sent)
            else:
                await sender.send(sent)
            error = await sender.recv()
            assert error["type"] == "error", what
            assert error["value"]["code"] == code, what
            assert text in error["value"]["message"], (what, error["value"]["message"])
            assert error["metadata"]["session_id"] == session_id and error["metadata"]["seq"] is None, what

        # Still open, still working: a valid marker is the very next thing the log and both clients see.
        await sender.send(_marker("Left", v=7))
        added = await sender.until("marker_added")
        watched = await watcher.until("marker_added")
        assert watched == added
        assert await _log_seqs(nc, session_id) == before + [added["metadata"]["seq"]]
        assert [e["type"] for e in watcher.events] == ["session_created", "marker_added"]
    finally:
        await sender.close()
        await watcher.close()


async def test_rest_lists_reads_writes_and_deletes_sessions(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    client, session_id, _ = await _new_session(stack)
    try:
        await client.send(_marker("Item", n=7))
        added = await client.until("marker_added")
        await client.until("transition_fired")
    finally:
        await client.close()

    made = await http.post(f"/bots/counter/sessions/{session_id}/markers",
                           json={"location": "Left", "data": {"v": 4}, "request_id": "q"})
    assert made.status_code == 201, made.text
    left = made.json()["event"]
    assert left["type"] == "marker_added" and left["value"]["data"] == {"v": 4}
    assert left["metadata"]["request_id"] == "q" and left["metadata"]["seq"] == made.json()["seq"]
    said = await http.post(f"/bots/counter/sessions/{session_id}/messages", json={"text": "hi"})
    assert said.status_code == 201 and said.json()["event"]["value"] == "hi"

    listed = (await http.get("/bots/counter/sessions")).json()
    log_seqs = await _log_seqs(nc, session_id)
    assert {"session_id": session_id, "events": len(log_seqs)} in listed["sessions"]

    detail = (await http.get(f"/bots/counter/sessions/{session_id}")).json()
    assert [e["metadata"]["seq"] for e in detail["events"]] == log_seqs
    # Served from the timeline's kept JSON: each event has exactly the documented shape (ClientEvent).
    from petribus_gateway.models import ClientEvent
    assert all(ClientEvent.model_validate(e).model_dump(mode="json") == e for e in detail["events"])
    assert detail["events"][-1] == said.json()["event"]  # as the REST write answered it
    assert detail["last_seq"] == log_seqs[-1]
    assert detail["marking"] == {"Left": [left["value"]]}  # the Item was consumed by its firing
    [firing] = detail["in_flight"]
    assert firing["transition"] == "work" and firing["status"] == "claimed"
    assert firing["consumed"] == [added["value"]]
    assert detail["chat"][0]["role"] == "user" and detail["chat"][0]["text"] == "hi"

    deleted = await http.delete(f"/bots/counter/sessions/{session_id}")
    assert deleted.status_code == 204
    gone = await http.get(f"/bots/counter/sessions/{session_id}")
    assert gone.status_code == 404
    assert gone.json()["code"] == "unknown_session" and repr(session_id) in gone.json()["message"]
    assert (await http.delete(f"/bots/counter/sessions/{session_id}")).status_code == 404
    listed = (await http.get("/bots/counter/sessions")).json()
    assert session_id not in {s["session_id"] for s in listed["sessions"]}
    assert await _log_seqs(nc, session_id) == []


async def test_rest_refuses_bad_input_and_unknown_names_without_touching_the_log(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    created = await http.post("/bots/counter/sessions")
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    before = await _log_seqs(nc, session_id)

    bad = await http.post(f"/bots/counter/sessions/{session_id}/markers",
                          json={"location": "Item", "data": {}})
    assert bad.status_code == 422
    assert bad.json()["code"] == "invalid_input" and "n: Field required" in bad.json()["message"]
    hidden = await http.post(f"/bots/counter/sessions/{session_id}/markers",
                             json={"location": "Done", "data": {"n": 1}})
    assert hidden.status_code == 422 and hidden.json()["code"] == "unknown_location"
    shapeless = await http.post(f"/bots/counter/sessions/{session_id}/messages", json={"words": "hi"})
    assert shapeless.status_code == 422 and "text" in shapeless.json()["message"]
    assert await _log_seqs(nc, session_id) == before

    unknown_bot = await http.get("/bots/nobot/sessions")
    assert unknown_bot.status_code == 404 and "'nobot'" in unknown_bot.json()["message"]
    nowhere = await http.post("/bots/counter/sessions/nosuch/messages", json={"text": "hi"})
    assert nowhere.status_code == 404 and "'nosuch'" in nowhere.json()["message"]
    # A wildcard is not a session id: it must never widen a read or a purge to other sessions.
    assert (await http.delete("/bots/counter/sessions/*")).status_code == 422
    assert (await http.get("/bots/counter/sessions/>")).status_code == 422
    assert await _log_seqs(nc, session_id) == before


async def test_rest_describes_bots_health_and_its_own_api(stack: Stack, http: httpx.AsyncClient) -> None:
    [bot] = (await http.get("/bots")).json()
    assert bot["name"] == "counter"
    locations = {loc["name"]: loc for loc in bot["locations"]}
    assert set(locations) == {"Item", "Left", "Right", "Pair"}  # Done is not exposed
    assert locations["Item"]["json_schema"]["required"] == ["n"]
    assert {t["name"] for t in bot["transitions"]} == {"work", "join"}

    health = await http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "nats": "connected",
                                                           "pools": "1 pools, 0 executors"}  # no executor here

    paths = (await http.get("/openapi.json")).json()["paths"]
    session = "/bots/{bot}/sessions/{session_id}"
    assert {"/healthz", "/bots", "/bots/{bot}/sessions", session, f"{session}/markers",
            f"{session}/messages"} <= set(paths)
    assert set(paths[session]) == {"get", "delete"}
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_healthz_is_503_without_nats(settings: Settings) -> None:
    conn = await bus.connect(settings.nats_url, name="test-closed")
    await conn.close()
    gateway = create_app(GatewayContext(settings, {}, conn, EventLog(conn)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        health = await http.get("/healthz")
    assert health.status_code == 503 and health.json() == {"status": "unavailable", "nats": "closed"}


async def test_a_gateway_that_cannot_listen_says_where_and_what_to_do(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = Gateway(settings.model_copy(update={"port": port}), [])
        with pytest.raises(PetribusError, match=f"cannot listen on 127.0.0.1:{port}.*PETRIBUS_PORT"):
            await gateway.start()
    assert gateway.nc is not None and gateway.nc.is_closed


async def test_a_client_too_slow_for_its_session_is_told_where_to_resume_and_loses_nothing(
    stack: Stack, nc, monkeypatch: pytest.MonkeyPatch
) -> None:
    from petribus_gateway import ws as ws_module

    monkeypatch.setattr(ws_module, "OUTBOX_SIZE", 1)
    monkeypatch.setattr(ws_module, "DELIVERED_MAX", 5)
    stalled = asyncio.Event()
    resume = asyncio.Event()
    sockets: list[Any] = []
    real_write = ws_module.SessionSocket._write

    async def slow_writer(self: Any) -> None:  # a client that stops reading for a while
        sockets.append(self)
        payload = await self.outbox.get()
        await self.ws.send_text(__import__("json").dumps(payload))
        self.last_seq = payload["metadata"]["seq"]
        stalled.set()
        await resume.wait()
        await real_write(self)

    monkeypatch.setattr(ws_module.SessionSocket, "_write", slow_writer)
    client, session_id, _ = await _new_session(stack)
    await stalled.wait()
    events = EventLog(nc)
    for i in range(20):
        await events.append(UserMessage(bot="counter", session_id=session_id, text=f"m{i}"))
    async with asyncio.timeout(20):
        while not sockets[0]._overflow:  # the events it could not hold arrived
            await asyncio.sleep(0.02)
    resume.set()
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await client.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == ws_module.CLOSE_STREAM_LOST
    since = int(closed.value.rcvd.reason.rsplit("since=", 1)[1])

    monkeypatch.undo()  # a client that keeps up, with the gateway's real limits
    again = await Client.connect(stack.ws_url("counter", session_id=session_id, since=since))
    try:
        last = await again.until(lambda e: e["type"] == "user_message" and e["value"] == "m19")
        texts = [e["value"] for e in again.events if e["type"] == "user_message"]
        assert texts == [f"m{i}" for i in range(20)][-len(texts):] and last["value"] == "m19"
        assert [e["metadata"]["seq"] for e in again.events] == await _log_seqs(nc, session_id, after=since)
    finally:
        await again.close()


def test_close_reasons_are_whole_and_fit_the_frame():
    from petribus_gateway.reasons import CLOSE_REASON_BYTES, close_reason as _reason

    long_clause = "unknown session " + "x" * 120 + " of bot 'hitl': it never existed"
    cases = {
        "unknown bot 'nobot'; this gateway serves ['a', 'b', 'c'] (see GET /bots) " + "y" * 100: "unknown bot 'nobot'",
        "short and complete": "short and complete",
        long_clause + "; list sessions with GET /bots/hitl/sessions": "unknown_session; the error event before this "
                                                                       "close says why",
    }
    for message, reason in cases.items():
        assert _reason(message, "unknown_session") == reason
        assert len(reason.encode()) <= CLOSE_REASON_BYTES
    assert _reason("é" * 200) == "closed; the error event before this close says why"  # no code: still whole
