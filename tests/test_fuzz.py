"""Hostile and broken input, fuzzed: thousands of random client messages over one WebSocket.

Every message is built to be refused (not JSON, not an object, wrong types, garbage values under
valid-looking types, unknown or already answered ids, unexposed locations, invalid UTF-8, messages
over the size limit). Each must get exactly one ``error`` event, to its sender, before anything sent
after it is handled; the connection and the session keep working; and in the end the log holds only
valid events of the kinds the test itself caused.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from petribus import subjects
from petribus.events import decode
from petribus.settings import Settings

from .conftest import app
from .harness import Client, Stack

HITL = app("hitl_bot")
MAX_MESSAGE = 2048
EXAMPLES = 190  # batches of 30-60 messages: some 7,000 messages (6,371 seen from 170: the sizes vary by run)
CLIENT_TYPES = ["user_message", "marker_added", "accept_transition", "reject_transition", "confirm_response"]
EXPOSED = {"Order": "id", "Ticket": "id", "Refund": "amount", "Upload": "description", "Blob": "size",
           "Question": "text"}
HIDDEN = ["Cancelled", "Escalated", "Closed", "RefundDecision", "Received"]
# An answered task and a made-up id the messages may name; filled in once the session exists.
IDS: dict[str, str] = {}
KEY = re.compile(r"[\x21-\x7e]{1,128}")  # what a request_id (an idempotency key) may be
TOKEN_CHARS = string.ascii_letters + string.digits + "-_"  # a token's secret: url-safe base64
PAIR = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what a pair_id may be (an id as an event gave it)
EXPECTED_CODES = {
    "invalid_json", "not_an_object", "unknown_field", "unknown_type", "invalid_value", "invalid_input",
    "unknown_location", "invalid_utf8", "message_too_large", "unknown_task", "unknown_request",
    "already_answered", "invalid_request_id", "too_deep", "too_many_members",
}

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.sampled_from(["answered", "unknown"]).map(lambda k: IDS[k]) | st.text(max_size=20)


def _frame(obj: Any) -> str:
    return json.dumps(obj)


def _valued(kind: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "value": value}


garbage_marker_data = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in EXPOSED.values()), json_values, max_size=4)
marker_values = st.one_of(
    json_values,
    st.builds(lambda loc, data: {"location": loc, "data": data},
              st.sampled_from(HIDDEN) | st.text(max_size=10), json_values),
    st.builds(lambda loc, data: {"location": loc, "data": data}, st.sampled_from(sorted(EXPOSED)),
              garbage_marker_data | json_values.filter(lambda v: not isinstance(v, dict))),
)
answers = st.one_of(
    st.builds(_valued, st.sampled_from(["accept_transition", "reject_transition"]),
              ids | json_values | st.builds(lambda t: {"task_id": t}, ids | json_values)),
    st.builds(_valued, st.just("reject_transition"),
              st.builds(lambda t, r: {"task_id": t, "reason": r}, ids, json_values)),
    st.builds(_valued, st.just("confirm_response"),
              json_values | st.builds(lambda r, a: {"request_id": r, "accepted": a}, ids, json_values)),
)
BEAM_METADATA = {"task_id", "transition_name", "session_id", "request_id"}  # what Beam's clients send
_absent = object()
beam_shaped = st.builds(  # Beam's client fields, right and wrong: metadata and pair_id on every type
    lambda kind, value, meta, pair: {k: v for k, v in {"type": kind, "value": value, "metadata": meta,
                                                       "pair_id": pair}.items() if v is not _absent},
    st.sampled_from(CLIENT_TYPES), st.just("hello") | ids | json_values,
    st.just(_absent) | st.dictionaries(st.sampled_from(sorted(BEAM_METADATA)) | st.text(max_size=8),
                                       ids | json_values, max_size=4) | json_values,
    st.just(_absent) | ids | json_values,
)
messages = st.one_of(
    st.text(max_size=60).map(str),  # mostly not JSON
    beam_shaped.map(_frame),
    json_values.filter(lambda v: not isinstance(v, dict)).map(_frame),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4).map(_frame),  # no or unknown type
    st.builds(_valued, st.just("user_message"),
              json_values.filter(lambda v: not isinstance(v, str)) | st.sampled_from(["", " ", "\n\t"])
              ).map(_frame),
    st.builds(_valued, st.just("marker_added"), marker_values).map(_frame),
    answers.map(_frame),
    st.builds(lambda kind, v, rid: {"type": kind, "value": v, "request_id": rid},  # a request_id not a string
              st.sampled_from(CLIENT_TYPES), json_values, json_values.filter(lambda v: not isinstance(v, str))
              ).map(_frame),
    st.builds(lambda kind, key: {"type": kind, "value": "x", key: 1}, st.sampled_from(CLIENT_TYPES),
              st.text(min_size=1, max_size=8).filter(lambda k: k not in ("type", "value", "request_id"))
              ).map(_frame),
    st.binary(max_size=60),  # binary frames: mostly not UTF-8
    st.integers(MAX_MESSAGE + 1, 3 * MAX_MESSAGE).map(  # a fine message, but too large
        lambda n: _frame({"type": "user_message", "value": "a" * n})),
    # Hostile shapes (docs/limits.md): deep nesting, bare or inside a valid-looking message, huge strings,
    # many keys, invalid UTF-8 inside otherwise valid JSON.
    st.integers(65, 200_000).map(lambda n: "[" * n),
    st.integers(65, 600).map(lambda n: _frame({"type": "marker_added", "value": {
        "location": "Order", "data": {"id": 1, "x": json.loads("[" * n + "]" * n)}}})),
    st.integers(MAX_MESSAGE // 2, MAX_MESSAGE * 40).map(lambda n: '{"type": "user_message", "value": "'
                                                         + "\\u00e9" * (n // 6) + '", "x": 1}'),
    st.integers(100, 400).map(lambda n: _frame({f"k{i}": i for i in range(n)})),
    st.binary(max_size=40).map(lambda b: b'{"type": "user_message", "value": "' + b + b'\xff\xfe"}'),
    # An auth message is read before anything else: deep (closed or not), or cut short with its token in it.
    st.builds(lambda n, closed: '{"type": "auth", "token": ' + "[" * n + ("]" * n + "}" if closed else ""),
              st.integers(65, 1000), st.booleans()),
    st.builds(lambda key, rest: '{"type": "auth", "token": "pb_' + key + "_" + rest,
              st.text("0123456789abcdef", min_size=16, max_size=16), st.text(TOKEN_CHARS, max_size=43)),
)


def _accepted_by_a_correct_gateway(frame: str | bytes) -> bool:
    """The few messages the strategies could build by chance that a gateway must accept."""
    try:
        text = frame.decode() if isinstance(frame, bytes) else frame
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):  # too deep is refused too
        return False
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE or not isinstance(obj, dict) or _deep(obj):
        return False
    if set(obj) - {"type", "value", "request_id", "metadata", "pair_id"}:
        return False
    # Beam's fields: metadata (strings, under Beam's four names, its request_id naming the message unless a
    # different one is given, its session_id this session's), a pair_id on confirm_response and user_message.
    metadata = obj.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or set(metadata) - BEAM_METADATA \
                or not all(v is None or isinstance(v, str) for v in metadata.values()):
            return False
        if metadata.get("session_id") not in (None, ""):
            return False  # the fuzz never knows the session's id
        inner = metadata.get("request_id") or None
        if inner is not None:
            if obj.get("request_id") not in (None, inner):
                return False
            obj = {**obj, "request_id": inner}
    pair_id = obj.get("pair_id")
    if pair_id not in (None, "") and not (obj.get("type") == "user_message" and isinstance(pair_id, str)
                                          and PAIR.fullmatch(pair_id)):
        return False  # a confirm_response (no answer can be valid here) or a user_message takes one
    # No request_id, or null, is none; one given names the message (an idempotency key): 1-128 printable
    # ASCII characters without spaces.
    request_id = obj.get("request_id")
    if request_id is not None and not (isinstance(request_id, str) and KEY.fullmatch(request_id)):
        return False
    value = obj.get("value")
    if obj.get("type") == "user_message":
        return isinstance(value, str) and bool(value.strip())
    if obj.get("type") == "marker_added":
        return (isinstance(value, dict) and value.get("location") in EXPOSED
                and isinstance(value.get("data"), dict) and EXPOSED[value["location"]] in value["data"])
    return False  # no answer can be valid: nothing is pending while the fuzz runs


batches = st.lists(messages.filter(lambda f: not _accepted_by_a_correct_gateway(f)), min_size=30, max_size=60)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    # No rate limits: the fuzz sends as fast as it can (the limits have tests of their own).
    small = settings.model_copy(update={"gateway_max_message_bytes": MAX_MESSAGE, "ws_message_rate": 0,
                                        "key_request_rate": 0, "max_body_bytes": 4 * MAX_MESSAGE})
    async with Stack(small, [HITL], parts=("scheduler", "executor", "gateway")) as s:
        yield s


async def _confirmed(client: Client, order: int) -> dict[str, Any]:
    """A valid marker fires: an Order, its confirmation accepted, its firing completed."""
    await client.send({"type": "marker_added", "value": {"location": "Order", "data": {"id": order}}})
    task = (await client.until("confirm_transition"))["metadata"]["task_id"]
    await client.send({"type": "accept_transition", "value": task})
    return await client.until(
        lambda e: e["type"] == "transition_completed" and e["metadata"]["task_id"] == task)


async def _refused_one_by_one(client: Client, batch: list[str | bytes], sync: str) -> None:
    start = len(client.events)
    for frame in batch:
        await client.ws.send(frame)
    await client.send({"type": "user_message", "value": sync})
    await client.until(lambda e: e["type"] == "user_message" and e["value"] == sync)
    replies = client.events[start:-1]
    not_errors = [e for e in replies if e["type"] != "error"]
    assert [e["type"] for e in replies] == ["error"] * len(batch), not_errors
    assert all(e["metadata"]["seq"] is None for e in replies)
    assert {e["value"]["code"] for e in replies} <= EXPECTED_CODES, {e["value"]["code"] for e in replies}


async def test_thousands_of_random_messages_are_refused_and_the_session_still_works(stack: Stack, nc) -> None:
    client = await Client.connect(stack.ws_url("hitl"))
    sid = (await client.recv())["value"]
    loop = asyncio.get_running_loop()
    sent: list[int] = []
    try:
        first = await _confirmed(client, 1)
        IDS.update(answered=first["metadata"]["task_id"], unknown="f" * 32)

        # Hypothesis drives from a thread; each batch runs on this loop, over this one connection.
        @hsettings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                          HealthCheck.data_too_large])
        @given(batch=batches)
        def refused(batch: list[str | bytes]) -> None:
            sync = f"sync {len(sent)}"
            asyncio.run_coroutine_threadsafe(_refused_one_by_one(client, batch, sync), loop).result(120)
            sent.append(len(batch))

        await asyncio.to_thread(refused)
        last = await _confirmed(client, 2)
    finally:
        await client.close()

    assert sum(sent) >= 6500
    assert last["value"]["outputs"][0]["data"] == {"id": 2}
    events = await _strictly_decoded(nc, sid)
    kinds = {e.type for e in events}
    assert kinds <= {"session_created", "user_message", "marker_added", "transition_fired",
                     "confirm_transition", "accept_transition", "transition_started",
                     "transition_completed"}, kinds
    assert [e.text for e in events if e.type == "user_message"] == [f"sync {i}" for i in range(len(sent))]
    assert [e.marker.data for e in events if e.type == "marker_added"] == [{"id": 1}, {"id": 2}]


async def _strictly_decoded(nc: Any, sid: str) -> list[Any]:
    """Every message on the session's subject, each decoded strictly (none skipped)."""
    js = nc.jetstream()
    subject = subjects.events("hitl", sid)
    info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
    stored = sum((info.state.subjects or {}).values())  # a subject per kind of event
    sub = await js.subscribe(subject, stream=subjects.EVENTS_STREAM, ordered_consumer=True)
    try:
        return [decode((await sub.next_msg(timeout=10)).data) for _ in range(stored)]
    finally:
        await sub.unsubscribe()


def _deep(value: Any, limit: int = 64) -> bool:
    """Whether ``value`` nests arrays and objects deeper than ``limit`` (iterative: the value may be deep)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


REST_EXAMPLES = 130  # batches of 30-50 bodies: some 4,500 requests (with the WebSocket fuzz, over 10,000 inputs)
bodies = st.one_of(
    messages.map(lambda f: f.encode("utf-8", "surrogatepass") if isinstance(f, str) else f),
    st.builds(lambda loc, data: json.dumps({"location": loc, "data": data}).encode(),
              st.sampled_from(HIDDEN) | st.text(max_size=10), json_values),
    st.builds(lambda text: json.dumps({"text": text}).encode(), json_values),
    st.integers(4 * MAX_MESSAGE + 1, 16 * MAX_MESSAGE).map(lambda n: b'{"text": "' + b"a" * n + b'"}'),
)


async def test_thousands_of_random_rest_bodies_get_4xx_and_only_valid_events_enter_the_log(
    stack: Stack, nc: Any
) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        sid = (await http.post("/bots/hitl/sessions")).json()["session_id"]
        routes = [f"/bots/hitl/sessions/{sid}/markers", f"/bots/hitl/sessions/{sid}/messages"]

        async def post_all(batch: list[bytes]) -> None:
            for i, body in enumerate(batch):
                answer = await http.post(routes[i % 2], content=body, headers={"content-type": "application/json"})
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                assert answer.status_code < 500, (answer.status_code, answer.text, body[:200])
                assert answer.status_code != 201 or _valid_rest(routes[i % 2], body), body[:200]

        @hsettings(max_examples=REST_EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                          HealthCheck.data_too_large])
        @given(batch=st.lists(bodies, min_size=30, max_size=50))
        def refused(batch: list[bytes]) -> None:
            asyncio.run_coroutine_threadsafe(post_all(batch), loop).result(120)

        await asyncio.to_thread(refused)
        assert (await http.get("/healthz")).status_code == 200

    assert sum(statuses.values()) >= 4000
    assert {413, 422} <= set(statuses), statuses  # the size and shape limits were really hit
    events = await _strictly_decoded(nc, sid)  # every stored event decodes strictly
    assert events[0].type == "session_created"
    assert not [e for e in events if e.type == "error"]  # no service failed on what got through


def _valid_rest(route: str, body: bytes) -> bool:
    """A body the REST routes may accept: a plain text message, or a marker of an exposed location."""
    obj = json.loads(body)
    if route.endswith("/messages"):
        return isinstance(obj.get("text"), str) and bool(obj["text"].strip())
    return obj.get("location") in EXPOSED
