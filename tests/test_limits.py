"""Bounded input, rates, quotas and a full log: each answered with a clear error, never a dropped connection
(docs/limits.md)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from petribus import subjects
from petribus.bus import EventLog
from petribus.errors import BusError
from petribus.events import UserMessage
from petribus.settings import Settings

from .conftest import app
from .harness import Client, Stack

COUNTER = app("counter")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with Stack(settings, [COUNTER], parts=("scheduler", "gateway")) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as client:
        yield client


async def _opened(stack: Stack) -> tuple[Client, str]:
    client = await Client.connect(stack.ws_url("counter"))
    created = await client.until("session_created")
    return client, created["metadata"]["session_id"]


async def test_deep_json_on_the_websocket_gets_an_error_and_the_connection_stays_open(stack: Stack) -> None:
    client, _ = await _opened(stack)
    await client.send("[" * 100_000)  # under the 1 MiB frame limit; json.loads alone would raise RecursionError
    error = await client.until("error")
    assert error["value"]["code"] == "too_deep"
    await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": 1}}})
    added = await client.until("marker_added")  # the same connection still works
    assert added["value"]["data"]["n"] == 1
    await client.close()


async def test_rest_bodies_over_the_limit_get_413_and_deep_ones_422(stack: Stack, http: httpx.AsyncClient) -> None:
    sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
    url = f"/bots/counter/sessions/{sid}/markers"
    big = b'{"location": "Item", "data": {"n": 1, "pad": "' + b"x" * (8 * 1024 * 1024) + b'"}}'
    declared = await http.post(url, content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    chunked = await http.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    deep = await http.post(url, content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert deep.status_code == 422 and deep.json()["code"] == "too_deep"
    broken = await http.post(url, content=b'{"location": "\xff"}', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["code"] == "invalid_utf8"
    fine = await http.post(url, json={"location": "Item", "data": {"n": 2}})
    assert fine.status_code == 201


async def test_a_connection_over_its_message_rate_gets_errors_and_stays_open(settings: Settings) -> None:
    slow = settings.model_copy(update={"ws_message_rate": 0.5, "ws_message_burst": 2})
    async with Stack(slow, [COUNTER], parts=("scheduler", "gateway")) as stack:
        client, _ = await _opened(stack)
        for n in range(4):
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": n}}})
        limited = [await client.until("error") for _ in range(2)]
        assert {e["value"]["code"] for e in limited} == {"rate_limited"}
        added = [e for e in client.events if e["type"] == "marker_added"]
        while len(added) < 2:
            added.append(await client.until("marker_added"))
        assert [e["value"]["data"]["n"] for e in added] == [0, 1]  # the burst passed; the rest was refused
        await client.send({"type": "user_message", "value": "still open?"})  # no token yet: refused again
        assert (await client.until("error"))["value"]["code"] == "rate_limited"
        await client.close()


async def test_requests_over_the_callers_rate_get_429_with_retry_after(settings: Settings) -> None:
    async with _limited(settings, {"key_request_rate": 0.2, "key_request_burst": 3}) as (stack, http):
        answers = [await http.get("/bots") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[-1].json()["code"] == "rate_limited"
        assert int(answers[-1].headers["Retry-After"]) >= 1


async def test_an_owner_over_its_session_quota_is_refused_on_rest_and_websocket(settings: Settings) -> None:
    async with _limited(settings, {"max_sessions_per_owner": 2}) as (stack, http):
        assert [(await http.post("/bots/counter/sessions")).status_code for _ in range(2)] == [201, 201]
        third = await http.post("/bots/counter/sessions")
        assert third.status_code == 429 and third.json()["code"] == "session_quota"
        async with websockets.connect(stack.ws_url("counter")) as ws:
            error = json.loads(await ws.recv())
            assert error["value"]["code"] == "session_quota"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
            # The close reason is a whole clause, never the message cut at the frame's 123 bytes.
            reason = closed.value.rcvd.reason
            assert len(error["value"]["message"].encode()) > 123 and len(reason.encode()) <= 123
            assert reason == error["value"]["message"].split(";")[0]
        listed = (await http.get("/bots/counter/sessions")).json()["sessions"]
        assert len(listed) == 2
        # Deleting one makes room (after the count is read again).
        await http.delete(f"/bots/counter/sessions/{listed[0]['session_id']}")
        _limits(stack).counted_at = float("-inf")
        assert (await http.post("/bots/counter/sessions")).status_code == 201


def _limits(stack: Stack) -> Any:
    layer = stack.gateway.app.middleware_stack
    while layer is not None and type(layer).__name__ != "Limits":
        layer = getattr(layer, "app", None)
    assert layer is not None
    return layer


async def test_a_full_log_refuses_appends_and_new_sessions_and_keeps_every_event(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PETRIBUS_EVENTS_MAX_BYTES", str(256 * 1024))
    async with _limited(settings, {}) as (stack, http):
        sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
        log = EventLog(stack.gateway.nc)  # a full stream is an answer, not an outage: no waiting it out
        info = await log.js.stream_info(subjects.EVENTS_STREAM)
        assert info.config.max_bytes == 256 * 1024 and info.config.discard == "new"
        landed = 0
        with pytest.raises(BusError) as full:
            for i in range(1000):
                await log.append(UserMessage(bot="counter", session_id=sid, text=f"{i} " + "x" * 4000))
                landed += 1
        assert full.value.code == "storage_full" and "nothing stored was lost" in full.value.message
        assert 0 < landed < 1000  # the limit was reached, and the append past it was refused
        assert await log.count("counter", sid) == landed + 1  # nothing acknowledged was dropped
        # A live session's client is told the same: 507 storage_full, not an outage to wait out.
        said = await http.post(f"/bots/counter/sessions/{sid}/messages", json={"text": "x" * 4000})
        assert said.status_code == 507 and said.json()["code"] == "storage_full", said.text
        _limits(stack)._storage = (float("-inf"), 0, -1)  # the log's usage is cached for a second
        refused = await http.post("/bots/counter/sessions")
        assert refused.status_code == 507 and refused.json()["code"] == "storage_full"
        assert await log.count("counter", sid) == landed + 1


async def test_the_session_quota_is_per_owner_of_the_api_key(settings: Settings, nc: Any) -> None:
    alice, bob = await _keys(nc, "alice", "bob")
    async with _limited(settings, {"max_sessions_per_owner": 1}) as (stack, http):
        assert (await http.post("/bots/counter/sessions", headers=_as(alice))).status_code == 201
        again = await http.post("/bots/counter/sessions", headers=_as(alice))
        assert again.status_code == 429 and "owner 'alice'" in again.json()["message"]
        assert (await http.post("/bots/counter/sessions", headers=_as(bob))).status_code == 201


async def test_a_body_is_shape_checked_whatever_its_content_type_says(stack: Stack, http: httpx.AsyncClient) -> None:
    sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
    url = f"/bots/counter/sessions/{sid}/markers"
    before = await EventLog(stack.gateway.nc).count("counter", sid)
    nested = json.loads("[" * 900 + "]" * 900)  # parses, and is deeper than any client message may be
    body = json.dumps({"location": "Item", "data": {"n": 1, "x": nested}}).encode()
    for kind in ("application/JSON", "Application/Json; charset=utf-8", "text/plain", "application/vnd.x+json"):
        deep = await http.post(url, content=body, headers={"content-type": kind})
        assert deep.status_code == 422 and deep.json()["code"] == "too_deep", (kind, deep.status_code, deep.text)
        deeper = await http.post(url, content=b"[" * 100_000, headers={"content-type": kind})
        assert deeper.status_code == 422 and deeper.json()["code"] == "too_deep", (kind, deeper.text)
    assert await EventLog(stack.gateway.nc).count("counter", sid) == before  # nothing of it was stored
    fine = await http.post(url, json={"location": "Item", "data": {"n": 2}},
                           headers={"content-type": "Application/JSON"})
    assert fine.status_code == 201, fine.text


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _keys(nc: Any, *owners: str) -> list[str]:
    """An API key for each owner, in order."""
    from petribus import keys

    return [(await keys.create(nc.jetstream(), owner))[0] for owner in owners]


@contextlib.asynccontextmanager
async def _limited(settings: Settings, limits: dict[str, Any],
                   token: str | None = None) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    """The scheduler and a gateway under ``limits``, and a client of it (with ``token``'s key, if given)."""
    async with Stack(settings.model_copy(update=limits), [COUNTER], parts=("scheduler", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, headers=_as(token) if token else None,
                              timeout=10) as http:
        yield stack, http


async def test_a_fork_is_a_new_session_under_the_owners_quota_and_the_storage_check(
    settings: Settings, nc: Any
) -> None:
    [alice] = await _keys(nc, "alice")
    async with _limited(settings, {"max_sessions_per_owner": 2}, alice) as (stack, http):
        sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
        forked = await http.post(f"/bots/counter/sessions/{sid}/fork", json={"at": 1})
        assert forked.status_code == 201, forked.text
        refused = [await http.post(f"/bots/counter/sessions/{sid}/fork", json={"at": 1}) for _ in range(2)]
        assert [(r.status_code, r.json()["code"]) for r in refused] == [(429, "session_quota")] * 2
        assert "owner 'alice'" in refused[0].json()["message"]
        listed = (await http.get("/bots/counter/sessions")).json()["sessions"]
        assert len(listed) == 2  # the session and its one fork
        _limits(stack)._storage = (float("inf"), 100, 100)  # the log as full as it may be for new sessions
        await http.delete(f"/bots/counter/sessions/{forked.json()['session_id']}")
        _limits(stack).counted_at = float("-inf")
        full = await http.post(f"/bots/counter/sessions/{sid}/fork", json={"at": 1})
        assert full.status_code == 507 and full.json()["code"] == "storage_full", full.text


async def test_a_websocket_that_sends_its_key_first_is_charged_to_the_keys_owner(settings: Settings, nc: Any) -> None:
    alice, bob = await _keys(nc, "alice", "bob")
    async with _limited(settings, {"max_sessions_per_owner": 1}) as (stack, http):
        assert (await http.post("/bots/counter/sessions", headers=_as(alice))).status_code == 201
        async with websockets.connect(stack.ws_url("counter")) as ws:  # a browser: the key as its first message
            await ws.send(json.dumps({"type": "auth", "token": alice}))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["value"]["code"] == "session_quota", error
            assert "owner 'alice'" in error["value"]["message"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
        assert len((await http.get("/bots/counter/sessions", headers=_as(alice))).json()["sessions"]) == 1
        # From the same address, bob's key starts his own (the address is not what is charged).
        async with websockets.connect(stack.ws_url("counter")) as ws:
            await ws.send(json.dumps({"type": "auth", "token": bob}))
            created = json.loads(await ws.recv())
            assert created["type"] == "session_created" and created["metadata"]["actor"]["owner"] == "bob"


async def test_every_stream_is_bounded_and_the_per_session_limit_counts_each_kind_of_event(
    settings: Settings, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PETRIBUS_EVENTS_MAX_PER_SESSION", "3")
    monkeypatch.setenv("PETRIBUS_WORK_MAX_BYTES", str(4 * 1024 * 1024))
    async with _limited(settings, {}) as (stack, http):
        js = nc.jetstream()
        for stream in (subjects.WORK_STREAM, subjects.TIMERS_STREAM, subjects.IDLE_STREAM):
            config = (await js.stream_info(stream)).config
            assert (config.max_bytes, config.discard) == (4 * 1024 * 1024, "new"), stream
        events = (await js.stream_info(subjects.EVENTS_STREAM)).config
        assert "one subject per session" not in (events.description or "")
        # A subject per kind of event of each session: the limit holds for each kind, not for their sum.
        sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
        said = [await http.post(f"/bots/counter/sessions/{sid}/messages", json={"text": f"m{i}"}) for i in range(4)]
        assert [s.status_code for s in said] == [201, 201, 201, 507]
        assert said[-1].json()["code"] == "storage_full"
        halted = await http.put(f"/bots/counter/sessions/{sid}/halt", json={"before": []})
        assert halted.status_code == 201, halted.text  # another kind of event still lands
        assert await EventLog(nc).count("counter", sid) == 5  # session_created, 3 user_message, halt_set


async def test_a_browser_sockets_messages_spend_its_keys_request_budget_with_its_rest_calls(
    settings: Settings, nc: Any
) -> None:
    [alice] = await _keys(nc, "alice")
    async with _limited(settings, {"key_request_rate": 0.001, "key_request_burst": 3}, alice) as (stack, http):
        client = await Client.connect(stack.ws_url("counter"))  # a browser: no header, the key comes first
        await client.send({"type": "auth", "token": alice})
        sid = (await client.until("session_created"))["metadata"]["session_id"]
        for n in range(2):
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": n}}})
        # From the key's budget, not the address's (which the handshake and the auth message have spent
        # down to one request).
        answered = [await client.until(lambda e: e["type"] in ("marker_added", "error")) for _ in range(2)]
        assert [e["type"] for e in answered] == ["marker_added"] * 2, answered
        # The socket spent two of the key's three requests: its REST calls have one left.
        answers = [await http.get("/bots") for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 429]
        assert "this API key" in answers[-1].json()["message"]
        # And the key's REST calls spent what the socket had left.
        await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": 2}}})
        error = await client.until("error")
        assert error["value"]["code"] == "rate_limited" and "this API key" in error["value"]["message"], error
        logged = await EventLog(nc).read("counter", sid)
        assert [e.marker.data["n"] for _, e in logged if e.type == "marker_added"] == [0, 1]
        await client.close()


@pytest.mark.parametrize("limit, code", [
    ({"max_sessions_per_owner": 2}, "session_quota"),
    ({"session_create_rate": 0.001, "session_create_burst": 2}, "rate_limited"),
])
async def test_a_fork_retried_with_its_idempotency_key_is_answered_again_and_not_charged_again(
    settings: Settings, nc: Any, limit: dict[str, Any], code: str
) -> None:
    [alice] = await _keys(nc, "alice")
    async with _limited(settings, limit, alice) as (stack, http):
        sid = (await http.post("/bots/counter/sessions")).json()["session_id"]
        url = f"/bots/counter/sessions/{sid}/fork"
        first = await http.post(url, json={"at": 1}, headers={"Idempotency-Key": "fork-1"})
        assert first.status_code == 201 and not first.json()["replayed"], first.text
        # The session and its fork use up the quota (or the new-session burst): a retry is no new session.
        retries = [await http.post(url, json={"at": 1}, headers={"Idempotency-Key": "fork-1"}) for _ in range(2)]
        assert [(r.status_code, r.json().get("code")) for r in retries] == [(201, None)] * 2, retries[0].text
        assert {r.json()["session_id"] for r in retries} == {first.json()["session_id"]}
        assert all(r.json()["replayed"] and r.headers["Idempotent-Replayed"] == "true" for r in retries)
        # A fresh key is a new fork, and charged as one.
        fresh = await http.post(url, json={"at": 1}, headers={"Idempotency-Key": "fork-2"})
        assert fresh.status_code == 429 and fresh.json()["code"] == code, fresh.text
        assert len((await http.get("/bots/counter/sessions")).json()["sessions"]) == 2
