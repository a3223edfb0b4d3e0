"""API keys, owners, Origin and audit over the real stack (docs/security.md): two owners never see or
touch each other's sessions on any route, an authorized bot needs a key and a public one does not, a
revoked key stops at once, a foreign page is refused, every request's event says who caused it (never
with the token), and a gateway reachable from elsewhere will not start without keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import websockets
from fastapi.routing import APIRoute, iter_route_contexts
from typer.testing import CliRunner

from petribus import bus, keys, subjects
from petribus.bus import EventLog
from petribus.embedded import NatsServer
from petribus.errors import PetribusError
from petribus.settings import Settings
from petribus_cli.keys import EXIT_BAD_INPUT, EXIT_FAILED, keys_app
from petribus_gateway.app import Gateway

from .conftest import app
from .harness import Client, Stack

COUNTER = app("counter")
PUBLIC = app("auth_public")
HITL = app("hitl_bot")
ALLOWED = "https://app.example"
UNUSED = "0123456789abcdef0123456789abcdef"  # a session id nobody made


class Tokens:
    def __init__(self, alice: str, bob: str, admin: str, public_only: str) -> None:
        self.alice, self.bob, self.admin, self.public_only = alice, bob, admin, public_only


@pytest.fixture
async def tokens(nc) -> Tokens:
    js = nc.jetstream()
    made = [(await keys.create(js, owner, admin=admin, bots=bots))[0]
            for owner, admin, bots in [("alice", False, ()), ("bob", False, ()), ("root", True, ()),
                                       ("carol", False, ("public",))]]
    return Tokens(*made)


@pytest.fixture
async def stack(settings: Settings, tokens: Tokens) -> AsyncIterator[Stack]:
    # No executor: nothing needs to run; the scheduler only claims.
    guarded = settings.model_copy(update={"allowed_origins": ALLOWED})
    async with Stack(guarded, [COUNTER, PUBLIC], parts=("scheduler", "gateway")) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _session(http: httpx.AsyncClient, token: str | None, bot: str = "counter") -> str:
    made = await http.post(f"/bots/{bot}/sessions", headers=auth(token) if token else {})
    assert made.status_code == 201, made.text
    return str(made.json()["session_id"])


async def _expect_closed(ws: Any, code: int) -> tuple[list[dict[str, Any]], str]:
    """Everything the server sent before closing with ``code``, and its reason."""
    received = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code, closed.value
    return received, closed.value.rcvd.reason


def _calls(stack: Stack, session_id: str, about: str = "{session_id}") -> list[tuple[str, str]]:
    """(method, path) of every REST route whose path names ``about``, read from the app so none is forgotten."""
    calls = []
    for found in iter_route_contexts(stack.gateway.app.routes):
        if isinstance(found.route, APIRoute) and about in found.path:
            path = found.path.format(bot="counter", session_id=session_id, task_id="t1", request_id="r1",
                                     file_id="f1")
            calls.extend((method, path) for method in sorted(found.methods or ()))
    return calls


def _same_answer(mine: httpx.Response, never: httpx.Response, session_id: str) -> None:
    assert (mine.status_code, mine.json()["code"]) == (never.status_code, never.json()["code"])
    assert mine.json()["message"].replace(session_id, UNUSED) == never.json()["message"]


# --- owners ----------------------------------------------------------------------------------------


async def test_another_owners_session_is_answered_like_one_that_never_existed_on_every_route(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens, nc
) -> None:
    mine = await _session(http, tokens.alice)
    before = await EventLog(nc).read("counter", mine)
    calls = _calls(stack, mine)
    assert len(calls) >= 10 and ("GET", f"/bots/counter/sessions/{mine}/files/f1") in calls
    body = {"at": 1, "before": [], "accepted": True, "text": "hi", "location": "Item", "data": {"n": 1}}
    for method, path in calls:
        theirs = await http.request(method, path, headers=auth(tokens.bob), json=body)
        never = await http.request(method, path.replace(mine, UNUSED), headers=auth(tokens.alice), json=body)
        assert theirs.status_code == 404, (method, path, theirs.text)
        _same_answer(theirs, never, mine)
    # A key limited to another bot sees this bot as one that does not exist, on every route that names one.
    for method, path in _calls(stack, mine, about="{bot}"):
        elsewhere = await http.request(method, path, headers=auth(tokens.public_only), json=body)
        assert (elsewhere.status_code, elsewhere.json()["code"]) == (404, "unknown_bot"), (method, path)
    assert await EventLog(nc).read("counter", mine) == before  # nothing of bob's (or carol's) landed

    # The owner and an admin still reach it.
    assert (await http.get(f"/bots/counter/sessions/{mine}", headers=auth(tokens.alice))).status_code == 200
    assert (await http.get(f"/bots/counter/sessions/{mine}", headers=auth(tokens.admin))).status_code == 200


async def test_listings_show_each_owner_their_own_sessions_and_an_admin_all(
    http: httpx.AsyncClient, tokens: Tokens
) -> None:
    alices = {await _session(http, tokens.alice), await _session(http, tokens.alice)}
    bobs = {await _session(http, tokens.bob)}

    async def listed(token: str) -> set[str]:
        found = await http.get("/bots/counter/sessions", headers=auth(token))
        assert found.status_code == 200, found.text
        return {s["session_id"] for s in found.json()["sessions"]}

    assert await listed(tokens.alice) == alices
    assert await listed(tokens.bob) == bobs
    assert await listed(tokens.admin) == alices | bobs
    assert [b["name"] for b in (await http.get("/bots", headers=auth(tokens.public_only))).json()] == ["public"]


async def test_the_websocket_hides_another_owners_session_like_an_unknown_one(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens
) -> None:
    mine = await _session(http, tokens.alice)
    answers = []
    for session_id in (mine, UNUSED):
        async with websockets.connect(stack.ws_url("counter", session_id=session_id),
                                      additional_headers=auth(tokens.bob)) as ws:
            received, reason = await _expect_closed(ws, 4404)
        answers.append((received[0]["value"]["code"], reason.replace(session_id, "ID")))
    assert answers[0] == answers[1] and answers[0][0] == "unknown_session"

    async with websockets.connect(stack.ws_url("counter", session_id=mine),
                                  additional_headers=auth(tokens.alice)) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert first["type"] == "session_created" and first["value"] == mine


# --- keys required, public bots --------------------------------------------------------------------


async def test_an_authorized_bot_refuses_a_request_without_a_valid_key_and_a_public_bot_takes_it(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens
) -> None:
    bare = await http.get("/bots/counter/sessions")
    assert bare.status_code == 401 and bare.json()["code"] == "unauthorized"
    assert bare.headers["WWW-Authenticate"].startswith("Bearer")
    assert "petribus keys create" in bare.json()["message"]
    assert (await http.post("/bots/counter/sessions")).status_code == 401
    forged = "pb_" + tokens.alice.split("_")[1] + "_" + "A" * 43  # a real key id, a wrong secret
    for bad in (forged, "not-a-token"):
        refused = await http.get("/bots/public/sessions", headers=auth(bad))  # a bad key is refused anywhere
        assert refused.status_code == 401 and "not valid" in refused.json()["message"]

    public = await _session(http, None, bot="public")
    assert (await http.get(f"/bots/public/sessions/{public}")).status_code == 200  # nobody's: its id is enough
    added = await http.post(f"/bots/public/sessions/{public}/markers",
                            json={"location": "Note", "data": {"text": "x"}})
    assert added.status_code == 201, added.text
    # Nobody's sessions of a public bot are not listed to a caller without a key while keys are in use.
    assert (await http.get("/bots/public/sessions")).json()["sessions"] == []
    # A key's session of a public bot is its owner's, like any other.
    carols = await _session(http, tokens.public_only, bot="public")
    assert (await http.get(f"/bots/public/sessions/{carols}")).status_code == 404
    assert (await http.get(f"/bots/public/sessions/{carols}", headers=auth(tokens.bob))).status_code == 404

    async with websockets.connect(stack.ws_url("counter")) as ws:
        await ws.send(json.dumps({"type": "user_message", "value": "hi"}))  # not an auth message
        received, _ = await _expect_closed(ws, 4401)
    assert [e["value"]["code"] for e in received] == ["unauthorized"]
    async with websockets.connect(stack.ws_url("public")) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "session_created"


async def test_a_browser_websocket_sends_its_key_as_the_first_message_never_in_the_url(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens, nc
) -> None:
    url = stack.ws_url("counter")
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": tokens.alice}))
        created = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert created["type"] == "session_created"
        assert created["metadata"]["actor"]["owner"] == "alice"
    assert tokens.alice not in url
    listed = (await http.get("/bots/counter/sessions", headers=auth(tokens.alice))).json()["sessions"]
    assert [s["session_id"] for s in listed] == [created["value"]]

    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": tokens.alice + "x"}))
        received, _ = await _expect_closed(ws, 4401)
    assert received[0]["value"]["code"] == "unauthorized"


async def test_a_revoked_key_is_refused_as_soon_as_the_gateway_hears_of_it(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens, nc
) -> None:
    mine = await _session(http, tokens.alice)
    key_id = tokens.alice.split("_")[1]
    listening = await websockets.connect(stack.ws_url("counter", session_id=mine),
                                         additional_headers=auth(tokens.alice))
    assert json.loads(await asyncio.wait_for(listening.recv(), 20))["type"] == "session_created"
    changed = asyncio.create_task(stack.gateway.keys.changed())
    await asyncio.sleep(0)  # waiting before the change is made
    assert (await keys.revoke(nc.jetstream(), key_id)) is not None
    await asyncio.wait_for(changed, 10)
    refused = await http.get(f"/bots/counter/sessions/{mine}", headers=auth(tokens.alice))
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    _, reason = await _expect_closed(listening, 4401)  # a connection made with it stops listening too
    assert "revoked" in reason
    # Still listed, revoked, so that its id in old events says whose it was.
    [record] = [r for r in await keys.listing(nc.jetstream()) if r.key_id == key_id]
    assert record.owner == "alice" and record.revoked is not None


# --- auth messages: bounded, and never logged ------------------------------------------------------


async def test_a_deep_auth_message_is_refused_with_an_error_and_never_breaks_the_connection(
    stack: Stack, tokens: Tokens
) -> None:
    deep = '{"type": "auth", "token": ' + "[" * 100_000 + "]" * 100_000 + "}"  # under 1 MiB
    async with websockets.connect(stack.ws_url("public"), max_size=None) as ws:
        client = Client(ws)
        await client.until("session_created")
        await client.send(deep)  # json.loads alone would raise RecursionError (close 1011)
        assert (await client.until("error"))["value"]["code"] == "too_deep"
        await client.send({"type": "marker_added", "value": {"location": "Note", "data": {"text": "still open"}}})
        assert (await client.until("marker_added"))["value"]["data"] == {"text": "still open"}
    # As the first message to a bot that needs a key: an error and the usual 4401, not an abnormal close.
    async with websockets.connect(stack.ws_url("counter"), max_size=None) as ws:
        await ws.send(deep)
        received, _ = await _expect_closed(ws, 4401)
    assert [e["value"]["code"] for e in received] == ["unauthorized"]


async def test_a_broken_auth_message_is_refused_without_its_token_reaching_a_log(
    stack: Stack, tokens: Tokens
) -> None:
    secret = tokens.alice.split("_", 2)[2]
    with structlog.testing.capture_logs() as logs:
        async with websockets.connect(stack.ws_url("public")) as ws:
            client = Client(ws)
            await client.until("session_created")
            await client.send('{"type":"auth","token":"' + tokens.alice)  # cut short: not JSON
            broken = await client.until("error")
            await client.send('{"token": "' + tokens.alice + '", "type": ')  # the type after the token
            other = await client.until("error")
    assert broken["value"]["code"] == other["value"]["code"] == "invalid_json"
    refused = [e for e in logs if e.get("event") == "client message refused"]
    assert len(refused) == 2, logs
    for text in (repr(logs), broken["value"]["message"], other["value"]["message"]):
        assert secret[:8] not in text and tokens.alice[:24] not in text


# --- Origin ----------------------------------------------------------------------------------------


async def test_a_foreign_origin_is_refused_and_the_gateways_own_and_allowed_ones_pass(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens
) -> None:
    own = stack.gateway.url
    foreign = await http.post("/bots/public/sessions", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and foreign.json()["code"] == "forbidden_origin"
    assert "https://evil.example" in foreign.json()["message"]
    before = (await http.get("/bots/public/sessions", headers=auth(tokens.admin))).json()["sessions"]
    assert before == []  # refused before anything was made
    for origin in (own, ALLOWED):
        assert (await http.post("/bots/public/sessions", headers={"Origin": origin})).status_code == 201
    assert (await http.get("/bots", headers={"Origin": "https://evil.example"})).status_code == 200  # reads pass

    async with websockets.connect(stack.ws_url("public"), origin="https://evil.example") as ws:
        received, reason = await _expect_closed(ws, 1008)
    assert received[0]["value"]["code"] == "forbidden_origin" and "Origin" in reason
    async with websockets.connect(stack.ws_url("public"), origin=own) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "session_created"


# --- audit -----------------------------------------------------------------------------------------


async def test_every_event_a_request_appended_records_who_caused_it_and_never_the_token(
    stack: Stack, http: httpx.AsyncClient, tokens: Tokens, nc
) -> None:
    mine = await _session(http, tokens.alice)
    added = await http.post(f"/bots/counter/sessions/{mine}/markers", headers=auth(tokens.alice),
                            json={"location": "Left", "data": {"v": 1}})
    assert added.status_code == 201
    halted = await http.put(f"/bots/counter/sessions/{mine}/halt", headers=auth(tokens.alice), json={"before": []})
    assert halted.status_code == 201, halted.text
    async with websockets.connect(stack.ws_url("counter", session_id=mine),
                                  additional_headers=auth(tokens.alice)) as ws:
        client = Client(ws)
        await client.send({"type": "user_message", "value": "hello"})
        await client.until("user_message")
    forked = await http.post(f"/bots/counter/sessions/{mine}/fork", headers=auth(tokens.admin),
                             json={"at": added.json()["seq"]})
    assert forked.status_code == 201

    key_id = tokens.alice.split("_")[1]
    log = await EventLog(nc).read("counter", mine)
    caused = {ev.type: ev.actor for _, ev in log if ev.actor is not None}
    assert set(caused) == {"session_created", "marker_added", "halt_set", "user_message"}
    assert {(a.owner, a.key_id, a.address) for a in caused.values()} == {("alice", key_id, "127.0.0.1")}
    [(_, first)] = (await EventLog(nc).read("counter", forked.json()["session_id"]))[:1]
    assert first.type == "session_forked" and first.actor is not None and first.actor.owner == "root"
    # The forked session is the admin's, not alice's.
    fork_path = f"/bots/counter/sessions/{forked.json()['session_id']}"
    assert (await http.get(fork_path, headers=auth(tokens.alice))).status_code == 404

    shown = (await http.get(f"/bots/counter/sessions/{mine}", headers=auth(tokens.alice))).json()
    assert shown["events"][0]["metadata"]["actor"] == {"owner": "alice", "key_id": key_id, "address": "127.0.0.1"}
    # No secret anywhere in the log or the keys bucket: only key ids and digests.
    raw = b"".join([*await _stream_bytes(nc, subjects.EVENTS_STREAM),
                    *await _stream_bytes(nc, "KV_" + keys.KEYS_BUCKET)])
    for token in (tokens.alice, tokens.bob, tokens.admin):
        assert token.encode() not in raw and token.split("_", 2)[2].encode() not in raw


async def test_answers_and_uploads_record_who_caused_them(settings: Settings, tokens: Tokens, nc) -> None:
    """accept/reject of a confirmation, a confirm_response and an input_file_response, over REST and the
    WebSocket: each records the key's owner, key id and address."""
    async with Stack(settings, [HITL], parts=("scheduler", "executor", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, headers=auth(tokens.alice), timeout=30) as http:
        client = Client(await websockets.connect(stack.ws_url("hitl"), additional_headers=auth(tokens.alice)))
        try:
            sid = (await client.until("session_created"))["value"]
            base = f"/bots/hitl/sessions/{sid}"

            def marker(location: str, **data: Any) -> dict[str, Any]:
                return {"type": "marker_added", "value": {"location": location, "data": data}}

            await client.send(marker("Order", id=1))
            task = (await client.until("confirm_transition"))["metadata"]["task_id"]
            accepted = await http.post(f"{base}/confirmations/{task}", json={"accepted": True})
            assert accepted.status_code == 201, accepted.text
            await client.send(marker("Ticket", id=2))
            task = (await client.until("confirm_transition"))["metadata"]["task_id"]
            await client.send({"type": "reject_transition", "value": task})
            await client.until("reject_transition")
            await client.send(marker("Refund", amount=5))
            asked = await client.until("confirm_request")
            await client.send({"type": "confirm_response",
                               "value": {"request_id": asked["metadata"]["request_id"], "accepted": True}})
            await client.until("confirm_response")
            await client.send(marker("Upload", description="a receipt"))
            wanted = (await client.until("input_file_request"))["value"]
            uploaded = await http.put(wanted["upload_url"], content=b"receipt")
            assert uploaded.status_code == 201, uploaded.text
            await client.until("input_file_response")
        finally:
            await client.close()

    key_id = tokens.alice.split("_")[1]
    log = await EventLog(nc).read("hitl", sid)
    answers = [ev for _, ev in log if ev.type in ("accept_transition", "reject_transition", "confirm_response",
                                                  "input_file_response")]
    assert sorted(ev.type for ev in answers) == ["accept_transition", "confirm_response", "input_file_response",
                                                 "reject_transition"]
    assert {(a.actor.owner, a.actor.key_id, a.actor.address) for a in answers if a.actor} == {
        ("alice", key_id, "127.0.0.1")}
    assert all(a.actor is not None for a in answers)


async def _stream_bytes(nc: Any, stream: str) -> list[bytes]:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.data or b"") + json.dumps(dict(msg.headers or {})).encode())
    return out


# --- the keys CLI ----------------------------------------------------------------------------------


def cli(server: NatsServer, *args: str):
    return CliRunner().invoke(keys_app, [*args, "--nats-url", server.url])


def test_keys_create_prints_the_token_once_and_stores_only_its_digest(nats_server: NatsServer) -> None:
    made = CliRunner().invoke(keys_app, ["create", "--owner", "alice", "--bot", "counter", "--nats-url",
                                         nats_server.url])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert re.fullmatch(r"pb_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", token)
    key_id, secret = token.split("_")[1], token.split("_", 2)[2]

    shown = cli(nats_server, "list")
    assert shown.exit_code == 0 and key_id in shown.output and "alice" in shown.output and "live" in shown.output
    assert token not in shown.output and secret not in shown.output

    async def stored() -> list[bytes]:
        nc = await bus.connect(nats_server.url, name="t")
        try:
            return await _stream_bytes(nc, "KV_" + keys.KEYS_BUCKET)
        finally:
            await nc.close()

    raw = asyncio.run(stored())
    assert len(raw) == 1 and secret.encode() not in raw[0] and token.encode() not in raw[0]
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw[0]

    revoked = cli(nats_server, "revoke", key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert "revoked" in cli(nats_server, "list").output
    assert cli(nats_server, "revoke", "f" * 16).exit_code == EXIT_FAILED
    bad = cli(nats_server, "create", "--owner", "no spaces")
    assert bad.exit_code == EXIT_BAD_INPUT and "not a valid name" in bad.output


# --- where the gateway listens ---------------------------------------------------------------------


async def test_a_gateway_reachable_from_elsewhere_without_keys_refuses_to_start_and_says_why(
    settings: Settings, nc
) -> None:
    exposed = settings.model_copy(update={"host": "0.0.0.0"})
    refused = Gateway(exposed, [])
    with pytest.raises(PetribusError, match="refusing to listen on 0.0.0.0.*no API key.*--insecure") as why:
        await refused.start()
    assert why.value.code == "gateway_insecure"

    insecure = Gateway(exposed.model_copy(update={"insecure": True}), [])
    await insecure.start()
    await insecure.stop()

    token, _ = await keys.create(nc.jetstream(), "alice")
    async with Stack(exposed, [COUNTER], parts=("gateway",)) as s, httpx.AsyncClient(base_url=s.gateway.url) as http:
        assert (await http.get("/bots/counter/sessions")).status_code == 401
        assert (await http.get("/bots/counter/sessions", headers=auth(token))).status_code == 200


def test_petribus_gateway_on_an_open_address_without_keys_exits_with_the_reason(nats_server: NatsServer) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "petribus"), "gateway", COUNTER, "--host", "0.0.0.0",
                           "--port", "0", "--nats-url", nats_server.url], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 1, done
    assert "refusing to listen on 0.0.0.0" in done.stderr and "petribus keys create" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_loopback_gateway_with_no_keys_stays_open_for_local_development(settings: Settings) -> None:
    async with Stack(settings, [COUNTER], parts=("gateway",)) as s, httpx.AsyncClient(base_url=s.gateway.url) as http:
        made = await http.post("/bots/counter/sessions")
        assert made.status_code == 201
        listed = (await http.get("/bots/counter/sessions")).json()["sessions"]
        assert [x["session_id"] for x in listed] == [made.json()["session_id"]]
        detail = (await http.get(f"/bots/counter/sessions/{made.json()['session_id']}")).json()
        assert detail["events"][0]["metadata"]["actor"] == {"owner": None, "key_id": None, "address": "127.0.0.1"}
        # A page of another site whose name now points at 127.0.0.1 (DNS rebinding) is its own "origin":
        # a gateway without keys answers only requests addressed to loopback.
        rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
        for method, path in (("GET", "/bots/counter/sessions"), ("POST", "/bots/counter/sessions")):
            refused = await http.request(method, path, headers=rebound)
            assert refused.status_code == 403 and refused.json()["code"] == "forbidden_host", refused.text
        assert (await http.get("/bots", headers={"Host": "localhost:1"})).status_code == 200
        assert (await http.get("/healthz", headers={"Host": "evil.example"})).status_code == 200


# --- the Python client -----------------------------------------------------------------------------


async def test_the_python_client_sends_its_key_on_rest_and_websocket_and_names_a_refusal(
    stack: Stack, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    from petribus.client import Client as PyClient
    from petribus.client import Unauthorized

    monkeypatch.delenv("PETRIBUS_API_KEY", raising=False)
    async with PyClient(stack.gateway.url, tokens.alice) as client:
        stream = client.stream("counter")
        try:
            async for event in stream:  # the WebSocket carries the key: the new session is alice's
                assert event.type == "session_created"
                break
        finally:
            await stream.close()
        assert list(await client.sessions("counter")) == [stream.session_id]
    async with PyClient(stack.gateway.url) as client:
        with pytest.raises(Unauthorized):
            await client.sessions("counter")
        stream = client.stream("counter")
        with pytest.raises(Unauthorized):
            async for _ in stream:
                pass
        await stream.close()
    monkeypatch.setenv("PETRIBUS_API_KEY", tokens.bob)  # the default, for the terminal chat and scripts
    async with PyClient(stack.gateway.url) as client:
        assert await client.sessions("counter") == {}
