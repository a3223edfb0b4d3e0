"""The gateway through a bus outage: clients are told to retry (503 + Retry-After, an ``error`` event),
never get a bare 500 or a dropped socket, and a retry with the same idempotency key lands once.

The outage is real: the fixture's nats-server process is stopped, and started again on the same port
and store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from rich.console import Console

from petribus import bus
from petribus.bus import EventLog
from petribus.chat import Chat
from petribus.embedded import NatsServer
from petribus.outage import on_disconnect
from petribus.settings import Settings
from petribus_gateway import idempotency

from .conftest import app
from .harness import Client, Stack
from .test_chat import Screen, Typist

COUNTER = app("counter")
SECRETS = ("nats://", "127.0.0.1", "pb.ev.", "Traceback")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    # The gateway alone: nothing consumes what is added, so the log shows exactly what clients sent.
    # A short outage budget: a request gives up (503) a second after the bus went away.
    short = settings.model_copy(update={"bus_outage_s": 1.0})
    async with Stack(short, [COUNTER], parts=("gateway",)) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=60) as client:
        yield client


async def _stop(server: NatsServer, stack: Stack) -> None:
    """Stop nats-server and wait until the gateway has lost its connection (its disconnect hook)."""
    lost = asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    unregister = on_disconnect(stack.gateway.nc, on_lost)
    try:
        server.stop()
        assert server.proc is not None and server.proc.poll() is not None, "nats-server is still running"
        await asyncio.wait_for(lost.wait(), 30)
    finally:
        unregister()
    assert not stack.gateway.nc.is_connected


def _restart(server: NatsServer) -> None:
    """Start the server again on its port and store: the gateway's connection finds it where it was."""
    server.port = int(server.url.rsplit(":", 1)[1])
    server.start()


async def _session(http: httpx.AsyncClient) -> str:
    resp = await http.post("/bots/counter/sessions")
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]


async def _log(url: str, session_id: str) -> list[tuple[int, Any]]:
    """The session's log through a connection of its own (made after any restart)."""
    nc = await bus.connect(url, name="test-reader")
    try:
        return await EventLog(nc).read("counter", session_id)
    finally:
        await nc.close()


async def _add_until_accepted(http: httpx.AsyncClient, path: str, body: dict[str, Any],
                              key: str) -> httpx.Response:
    """What a client does with 503: wait Retry-After, send the same request with the same key."""
    for _ in range(10):
        resp = await http.post(path, json=body, headers={"Idempotency-Key": key})
        if resp.status_code != 503:
            return resp
        await asyncio.sleep(float(resp.headers["Retry-After"]))
    raise AssertionError(f"still 503 after 10 tries: {resp.text}")


async def test_a_rest_add_during_an_outage_gets_503_and_its_retry_lands_once(
    stack: Stack, http: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    session_id = await _session(http)
    path = f"/bots/counter/sessions/{session_id}/markers"
    body = {"location": "Item", "data": {"n": 1}}

    await _stop(nats_server, stack)
    try:
        health = await http.get("/healthz")
        here = f"/bots/counter/sessions/{session_id}"
        refused, *others = await asyncio.gather(  # every route that touches the log, at once
            http.post(path, json=body, headers={"Idempotency-Key": "add-1"}),
            http.post(f"{here}/messages", json={"text": "hi"}),
            http.post(f"{here}/confirmations/task1", json={"accepted": True}),
            http.post(f"{here}/confirm_requests/question1", json={"accepted": True}),
            http.put(f"{here}/files/{'f' * 32}", content=b"bytes"),
            http.get(f"{here}/files/{'f' * 32}"),
            http.post("/bots/counter/sessions"),
            http.get("/bots/counter/sessions"),
            http.delete(here),
            http.get(here),
        )
        read = others[-1]
    finally:
        _restart(nats_server)

    assert health.status_code == 503 and health.json()["nats"] != "connected"  # the outage was real
    for resp in (refused, *others):
        assert resp.status_code == 503, (resp.request.method, resp.request.url.path, resp.text)
        assert int(resp.headers["Retry-After"]) > 0
        error = resp.json()
        assert error["code"] == "bus_unavailable"
        assert not any(s in error["message"] for s in SECRETS), error["message"]
    assert "Idempotency-Key" in refused.json()["message"]
    assert "nothing was read" in read.json()["message"]

    first = await _add_until_accepted(http, path, body, "add-1")
    again = await http.post(path, json=body, headers={"Idempotency-Key": "add-1"})

    assert first.status_code == 201 and again.status_code == 201, (first.text, again.text)
    assert first.json()["replayed"] is False and "Idempotent-Replayed" not in first.headers
    assert again.json()["replayed"] is True and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["seq"] == first.json()["seq"]
    assert again.json()["event"] == first.json()["event"]
    added = [(seq, ev) for seq, ev in await _log(nats_server.url, session_id) if ev.type == "marker_added"]
    assert [seq for seq, _ in added] == [first.json()["seq"]]
    assert added[0][1].id == first.json()["event"]["metadata"]["event_id"]


async def test_a_rest_add_sent_twice_with_one_key_lands_once_and_a_new_key_adds_again(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    session_id = await _session(http)
    path = f"/bots/counter/sessions/{session_id}/messages"

    first = await http.post(path, json={"text": "hello"}, headers={"Idempotency-Key": "m-1"})
    again = await http.post(path, json={"text": "hello"}, headers={"Idempotency-Key": "m-1"})
    other = await http.post(path, json={"text": "hello"}, headers={"Idempotency-Key": "m-2"})
    unkeyed = await http.post(path, json={"text": "hello"})

    assert [r.status_code for r in (first, again, other, unkeyed)] == [201] * 4
    assert again.json()["seq"] == first.json()["seq"] and again.json()["replayed"] is True
    assert other.json()["seq"] > first.json()["seq"] and other.json()["replayed"] is False
    said = [seq for seq, ev in await EventLog(nc).read("counter", session_id) if ev.type == "user_message"]
    assert said == [first.json()["seq"], other.json()["seq"], unkeyed.json()["seq"]]


async def test_a_key_names_one_request_per_session(stack: Stack, http: httpx.AsyncClient, nc) -> None:
    one, two = await _session(http), await _session(http)
    add = {"location": "Item", "data": {"n": 1}}

    in_one = await http.post(f"/bots/counter/sessions/{one}/markers", json=add, headers={"Idempotency-Key": "k"})
    in_two = await http.post(f"/bots/counter/sessions/{two}/markers", json=add, headers={"Idempotency-Key": "k"})
    reused = await http.post(f"/bots/counter/sessions/{one}/markers", json={**add, "data": {"n": 2}},
                             headers={"Idempotency-Key": "k"})

    assert in_one.status_code == 201 and in_two.status_code == 201
    assert in_two.json()["replayed"] is False  # another session's key is another key
    assert in_one.json()["event"]["value"]["id"] != in_two.json()["event"]["value"]["id"]
    assert reused.status_code == 409 and reused.json()["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "tab\there"])
async def test_an_invalid_idempotency_key_is_refused_with_400(stack: Stack, http: httpx.AsyncClient,
                                                               key: str) -> None:
    session_id = await _session(http)
    resp = await http.post(f"/bots/counter/sessions/{session_id}/messages", json={"text": "hi"},
                           headers={"Idempotency-Key": key})
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_idempotency_key", resp.text


async def test_a_websocket_message_sent_twice_with_one_request_id_lands_once(stack: Stack, nc) -> None:
    client = await Client.connect(stack.ws_url("counter"))
    try:
        session_id = (await client.until("session_created"))["value"]
        item = {"type": "marker_added", "value": {"location": "Item", "data": {"n": 1}}}
        await client.send({**item, "request_id": "w-1"})
        await client.send({**item, "request_id": "w-1"})
        await client.send({**item, "request_id": "w-2"})
        await client.until(lambda e: e["metadata"].get("request_id") == "w-2")
        await client.send({**item, "request_id": "not ascii é"})
        refused = await client.until("error")
    finally:
        await client.close()

    seen = [e["metadata"]["request_id"] for e in client.events if e["type"] == "marker_added"]
    assert seen == ["w-1", "w-2"]
    logged = [ev.request_id for _, ev in await EventLog(nc).read("counter", session_id)
              if ev.type == "marker_added"]
    assert logged == ["w-1", "w-2"]
    assert refused["value"]["code"] == "invalid_request_id"
    assert refused["metadata"]["request_id"] is None  # not echoed: it is not a request id


async def test_a_websocket_message_during_an_outage_gets_an_error_and_its_resend_lands_once(
    stack: Stack, nats_server: NatsServer
) -> None:
    client = await Client.connect(stack.ws_url("counter"))
    try:
        session_id = (await client.until("session_created"))["value"]
        message = {"type": "user_message", "value": "hello", "request_id": "r-1"}
        await _stop(nats_server, stack)
        try:
            await client.send(message)
            error = await client.until("error", timeout=60)
            newcomer = await Client.connect(stack.ws_url("counter"))
            refused = await newcomer.until("error")
            closed = await _closed(newcomer)
        finally:
            _restart(nats_server)
        await client.send(message)  # the same request_id: recorded once however many tries landed
        await client.send({**message, "value": "and then", "request_id": "r-2"})
        logged = await _log_until(nats_server.url, session_id, "r-2")
        await client.until(lambda e: e["metadata"].get("request_id") == "r-2")  # the stream came back
    finally:
        await client.close()

    assert error["value"]["code"] == "bus_unavailable"
    assert error["metadata"]["request_id"] == "r-1"
    assert "not recorded" in error["value"]["message"] and "same request_id" in error["value"]["message"]
    assert not any(s in error["value"]["message"] for s in SECRETS)
    said = [ev.request_id for _, ev in logged if ev.type == "user_message"]
    assert said == ["r-1", "r-2"]
    streamed = [e["metadata"]["request_id"] for e in client.events if e["type"] == "user_message"]
    assert streamed == ["r-1", "r-2"]  # each once, on the connection that lived through the outage
    assert refused["value"]["code"] == "bus_unavailable" and closed == 1013  # "try again later"


async def _closed(client: Client) -> int | None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def _log_until(url: str, session_id: str, request_id: str) -> list[tuple[int, Any]]:
    """The session's log once an event with ``request_id`` is in it (awaited as it lands)."""
    nc = await bus.connect(url, name="test-reader")
    try:
        log = EventLog(nc)
        found = await log.wait_for("counter", session_id, after=0, timeout=60,
                                   match=lambda ev: ev.request_id == request_id)
        assert found is not None, f"no event with request_id {request_id!r} landed"
        return await log.read("counter", session_id)
    finally:
        await nc.close()


async def test_chat_resends_a_line_the_bus_could_not_take_with_the_same_request_id(
    stack: Stack, nats_server: NatsServer, tmp_path
) -> None:
    screen, typist = Screen(), Typist()
    console = Console(file=screen, width=200, soft_wrap=True, markup=False, emoji=False, highlight=False)
    chat = Chat(stack.gateway.url.replace("http://", "ws://"), "counter", console=console,
                download_dir=tmp_path / "downloads")
    running = asyncio.create_task(chat.run(typist.lines()))
    try:
        await screen.shows("[session_created]")
        await _stop(nats_server, stack)
        try:
            typist.type("hello")
            await screen.shows("[resending]", timeout=60)
        finally:
            _restart(nats_server)
        assert chat.session_id is not None
        [error] = chat.errors
        logged = await _log_until(nats_server.url, chat.session_id, error["metadata"]["request_id"])
        await screen.shows("[user_message] hello")
        assert not chat.unconfirmed  # the log showed it: nothing left to resend
    finally:
        typist.type("/quit")
        await running

    assert error["value"]["code"] == "bus_unavailable"
    said = [ev for _, ev in logged if ev.type == "user_message"]
    assert [(ev.text, ev.request_id) for ev in said] == [("hello", error["metadata"]["request_id"])]


def test_a_key_gives_the_same_event_and_marker_ids_in_one_session_only() -> None:
    from petribus.events import Marker, MarkerAdded

    def add(session_id: str) -> MarkerAdded:
        return MarkerAdded(bot="counter", session_id=session_id, source="api",
                           marker=Marker(location="Item", data={"n": 1}))

    a, b, c = (idempotency.keyed(add("s1"), "k"), idempotency.keyed(add("s1"), "k"),
               idempotency.keyed(add("s2"), "k"))
    assert (a.id, a.marker.id) == (b.id, b.marker.id)
    assert a.id != c.id and a.marker.id != c.marker.id and a.id != a.marker.id
    assert idempotency.msg_id("s1", "k") != idempotency.msg_id("s2", "k")


async def test_chat_resends_an_unconfirmed_line_after_the_connection_drops(tmp_path) -> None:
    """A gateway that drops the connection before recording a line: the chat, reconnected, sends it again
    with the same request_id (a stand-in gateway, so the drop happens exactly there)."""
    import json

    from websockets.asyncio.server import ServerConnection, serve

    received: list[dict[str, Any]] = []
    resent = asyncio.Event()

    async def gateway(ws: ServerConnection) -> None:
        if not received:
            await ws.send(json.dumps({"type": "session_created", "value": "s1",
                                      "metadata": {"session_id": "s1", "seq": 1}}))
            received.append(json.loads(await ws.recv()))
            await ws.close(1011, "stream lost; reconnect with since=1")  # not recorded
            return
        assert ws.request is not None and "since=1" in ws.request.path
        message = json.loads(await ws.recv())
        received.append(message)
        await ws.send(json.dumps({"type": "user_message", "value": message["value"],
                                  "metadata": {"session_id": "s1", "seq": 2,
                                               "request_id": message["request_id"]}}))
        resent.set()
        await ws.wait_closed()

    screen, typist = Screen(), Typist()
    console = Console(file=screen, width=200, soft_wrap=True, markup=False, emoji=False, highlight=False)
    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        chat = Chat(f"ws://127.0.0.1:{port}", "counter", console=console, download_dir=tmp_path / "downloads")
        running = asyncio.create_task(chat.run(typist.lines()))
        try:
            await screen.shows("[session_created]")
            typist.type("hello")
            await resent.wait()
            await screen.shows("[user_message] hello")
        finally:
            typist.type("/quit")
            await running

    first, second = received
    assert first["type"] == second["type"] == "user_message" and first["value"] == second["value"] == "hello"
    assert first["request_id"] and second["request_id"] == first["request_id"]
    assert "[reconnecting]" in screen.getvalue()
    assert not chat.unconfirmed
