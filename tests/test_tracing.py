"""Traces (petribus.tracing): one client message is one trace, from the WebSocket to the outcome it causes.

The spans are caught by an in-memory exporter installed through ``tracing.installed``; the stack is the
real one (nats-server, scheduler, executor, gateway, and the LLM service against the scripted
OpenAI-compatible server). Off by default: without ``OTEL_*`` nothing is installed and no event
carries a trace.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from petribus import logs, subjects, tracing
from petribus.bus import EventLog
from petribus.settings import Settings

from .conftest import app
from .harness import Client, Stack
from .scripted_llm import USAGE, ScriptedLLM, say

COUNTER = app("counter")
LLM_APP = app("llm_orders")
FIRING_EVENTS = ("marker_added", "transition_fired", "transition_started", "transition_completed")
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
             "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", tracing.CONTENT_ENV)


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from a process with no OTEL_* set and nothing installed, and leaves it so."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    tracing.reset()
    yield
    tracing.reset()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    with tracing.installed(SimpleSpanProcessor(exporter)):
        yield exporter


def _ids(tp: str | None) -> tuple[int, int]:
    """(trace id, span id) of a traceparent."""
    assert tp is not None
    _, trace_id, span_id, _ = tp.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def _session_log(nc: Any, bot: str, session_id: str, until: str, timeout: float = 30.0) -> list[Any]:
    """The session's stored messages (with headers), read as they land until one of type ``until``."""
    found: list[Any] = []
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        found.append(msg)
        if json.loads(msg.data)["type"] == until:
            done.set()

    sub = await nc.jetstream().subscribe(subjects.events(bot, session_id), ordered_consumer=True, cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return found


def _chain(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """Names from ``span`` up through its parents to the root."""
    names = [span.name]
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_a_websocket_marker_is_one_trace_from_the_message_to_transition_completed(
    settings: Settings, nc: Any, spans: InMemorySpanExporter
) -> None:
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor", "gateway")) as stack:
        client = await Client.connect(stack.ws_url("counter"))
        try:
            created = await client.until("session_created")
            session_id = created["metadata"]["session_id"]
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": 1}}})
            stored = await _session_log(nc, "counter", session_id, until="transition_completed")
        finally:
            await client.close()

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    [completed_append] = [s for s in finished if s.name == "append transition_completed"]
    # Child to parent: the executor's append, its run, the claim, the decision on the marker, the marker's
    # append, and the WebSocket message that began it all.
    assert _chain(completed_append, by_id) == [
        "append transition_completed", "executor run", "scheduler claim", "scheduler decide",
        "append marker_added", "gateway ws message"]
    root = by_id[completed_append.parent.span_id]
    while root.parent is not None:
        root = by_id[root.parent.span_id]
    trace_id = root.context.trace_id
    assert root.kind.name == "SERVER" and root.attributes["petribus.message_type"] == "marker_added"
    claim_append = _span("append transition_fired", finished)
    assert by_id[claim_append.parent.span_id].name == "scheduler claim"

    # What the log stores: each event of the firing names the span that appended it, in the same trace,
    # in its trace field and in its traceparent header alike.
    events: dict[str, Any] = {}
    for msg in stored:
        event = json.loads(msg.data)
        events[event["type"]] = event
        if event["type"] in FIRING_EVENTS:
            assert msg.headers[tracing.TRACEPARENT] == event["trace"]
            assert _ids(event["trace"])[0] == trace_id
    marker_append = _span("append marker_added", finished)
    assert _ids(events["marker_added"]["trace"]) == (trace_id, marker_append.context.span_id)
    assert _ids(events["transition_fired"]["trace"]) == (trace_id, claim_append.context.span_id)
    assert _ids(events["transition_completed"]["trace"]) == (trace_id, completed_append.context.span_id)
    run = by_id[completed_append.parent.span_id]
    assert _ids(events["transition_started"]["trace"]) == (trace_id, run.context.span_id)
    assert run.attributes["petribus.firing_id"] == events["transition_completed"]["firing_id"]
    # The work item carried the claim's context: the run is the claim's child.
    assert by_id[run.parent.span_id].name == "scheduler claim"


async def test_a_decision_on_an_event_a_read_brought_early_is_in_that_events_trace(
    settings: Settings, nc: Any, spans: InMemorySpanExporter
) -> None:
    """A delivered session_created whose fold read the whole subject, marker included (a rebuild reads to
    the end): the decision acts on the marker, so it belongs to the marker's trace, not to
    session_created's; the delivered event is a link."""
    from petribus.core import fold
    from petribus.events import Marker, MarkerAdded, SessionCreated
    from petribus.loader import load_net
    from petribus_scheduler.app import Delivered, Scheduler

    log = EventLog(nc)
    with tracing.span("open"):
        await log.append(SessionCreated(bot="counter", session_id="early"))
    with tracing.span("add"):
        await log.append(MarkerAdded(bot="counter", session_id="early", marker=Marker(location="Item",
                                                                                      data={"n": 5})))
    sub = await nc.jetstream().pull_subscribe(subjects.events("counter", "early"), durable="tracing-early")
    [created_msg] = await sub.fetch(1)
    state = fold(await log.read("counter", "early"))
    scheduler = Scheduler(settings, [load_net(COUNTER)])
    scheduler.js = nc.jetstream()
    with await scheduler._decision_span(("counter", "early"), [Delivered(created_msg, 0)], state) as decide:
        pass

    appended = {s.name: s for s in spans.get_finished_spans() if s.name.startswith("append ")}
    assert decide.parent.span_id == appended["append marker_added"].context.span_id
    assert decide.context.trace_id == appended["append marker_added"].context.trace_id
    created_append = appended["append session_created"]
    assert [link.context.span_id for link in decide.links] == [created_append.context.span_id]


async def test_a_rest_write_is_a_trace_of_its_own_and_its_keyed_retry_is_still_the_same_request(
    settings: Settings, nc: Any, spans: InMemorySpanExporter
) -> None:
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url) as http:
        session_id = (await http.post("/bots/counter/sessions")).json()["session_id"]
        body = {"location": "Item", "data": {"n": 4}}
        first = await http.post(f"/bots/counter/sessions/{session_id}/markers", json=body,
                                headers={"Idempotency-Key": "k1"})
        again = await http.post(f"/bots/counter/sessions/{session_id}/markers", json=body,
                                headers={"Idempotency-Key": "k1"})
        stored = await _session_log(nc, "counter", session_id, until="transition_completed")

    # Each request is its own trace (the retry's trace differs), yet the retry is the same request.
    assert (first.status_code, again.status_code) == (201, 201) and again.json()["replayed"] is True
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.name == "gateway rest marker_added"]
    assert len(roots) == 2 and roots[0].context.trace_id != roots[1].context.trace_id
    assert all(s.parent is None and s.kind.name == "SERVER" for s in roots)
    [added] = [json.loads(m.data) for m in stored if json.loads(m.data)["type"] == "marker_added"]
    by_id = {s.context.span_id: s for s in finished}
    append = by_id[_ids(added["trace"])[1]]
    assert append.name == "append marker_added" and append.parent.span_id == roots[0].context.span_id
    completed = [s for s in finished if s.name == "append transition_completed"]
    assert [s.context.trace_id for s in completed] == [roots[0].context.trace_id]


def _span(name: str, finished: Any) -> ReadableSpan:
    [found] = [s for s in finished if s.name == name]
    return found


async def test_without_otel_settings_no_provider_is_installed_and_no_event_carries_a_trace(
    settings: Settings, nc: Any
) -> None:
    from opentelemetry import trace as otel

    async with Stack(settings, [COUNTER], parts=("scheduler", "executor", "gateway")) as stack:
        client = await Client.connect(stack.ws_url("counter"))
        try:
            created = await client.until("session_created")
            session_id = created["metadata"]["session_id"]
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": 2}}})
            stored = await _session_log(nc, "counter", session_id, until="transition_completed")
        finally:
            await client.close()
    assert not tracing.active() and tracing.provider() is None
    assert type(otel.get_tracer_provider()).__name__ == "ProxyTracerProvider"  # nobody installed one either
    assert tracing.traceparent() is None and tracing.current_ids() is None
    assert len(stored) >= 5
    for msg in stored:
        assert "trace" not in json.loads(msg.data)
        assert tracing.TRACEPARENT not in (msg.headers or {})


def test_off_the_hooks_make_no_span_and_read_no_header() -> None:
    assert not tracing.active()
    first = tracing.span("x", parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert first is tracing.span("y")  # one shared no-op: nothing made per call
    with first as made:
        assert made is None and tracing.traceparent() is None
    assert tracing.parent_of({tracing.TRACEPARENT: "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, "t") is None


def test_off_a_service_process_does_not_even_import_opentelemetry() -> None:
    script = ("import sys; from petribus import bus, logs, tracing; "
              "logs.get('x').info('a line'); "
              "assert not tracing.active(); "
              "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
])
def test_tracing_is_on_only_when_the_otel_variables_ask_for_export(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.configure(set_global=False) is on
    assert (tracing.provider() is not None) is on


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that records what it is sent."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:  # the stdlib's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_with_an_otlp_endpoint_spans_are_exported_over_http(
    monkeypatch: pytest.MonkeyPatch, collector: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "petribus-test")
    assert tracing.configure(set_global=False)
    with tracing.span("exported", attributes={"petribus.bot": "counter"}):
        pass
    provider = tracing.provider()
    assert provider is not None and provider.force_flush()
    [(path, content_type, body)] = _Collector.received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    assert b"exported" in body and b"petribus-test" in body


def test_a_json_log_line_made_inside_a_span_carries_its_trace_and_span_ids(
    spans: InMemorySpanExporter
) -> None:
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    try:
        log = logs.get("petribus.test")
        log.info("outside")
        with tracing.span("with a log line"):
            log.info("inside", session_id="s1")
            ids = tracing.current_ids()
    finally:
        logs.configure()
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    [made] = spans.get_finished_spans()
    assert ids == (f"{made.context.trace_id:032x}", f"{made.context.span_id:016x}")
    assert (inside["trace_id"], inside["span_id"]) == ids and inside["session_id"] == "s1"


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM() as server:
        yield server


@pytest.mark.parametrize("content", [False, True])
async def test_a_model_call_is_a_span_with_its_model_latency_and_tokens_and_text_only_when_asked(
    settings: Settings, nc: Any, llm: ScriptedLLM, spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch, content: bool
) -> None:
    if content:
        monkeypatch.setenv(tracing.CONTENT_ENV, "1")
    llm.when("Who is the user?", say("The user is erin."))
    with_model = settings.model_copy(update={"openai_api_key": SecretStr("sk-test"),
                                             "openai_base_url": llm.base_url})
    async with Stack(with_model, [LLM_APP]) as stack:
        client = await Client.connect(stack.ws_url("llm_orders"))
        try:
            created = await client.until("session_created")
            session_id = created["metadata"]["session_id"]
            await client.send({"type": "user_message", "value": "hello"})
            await client.until("agent_message")
            await client.send({"type": "marker_added", "value": {"location": "Question",
                                                                 "data": {"text": "Who is the user?"}}})
            await _session_log(nc, "llm_orders", session_id, until="transition_completed")
        finally:
            await client.close()

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    reply, chat = sorted((s for s in finished if s.name == "chat gpt-test"), key=lambda s: s.start_time)
    # The reply to the user streams; a transition's blocking prompt does not. Both report the usage.
    assert [s.attributes["petribus.llm.streamed"] for s in (reply, chat)] == [True, False]
    for call in (reply, chat):
        assert call.attributes["gen_ai.request.model"] == "gpt-test"
        assert call.attributes["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
        assert call.attributes["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
        assert call.attributes["petribus.llm.latency_ms"] >= 0
    assert _chain(reply, by_id) == ["chat gpt-test", "llm answer user_message", "append user_message",
                                    "gateway ws message"]
    texts = {k: v for k, v in chat.attributes.items() if k in ("gen_ai.input.messages", "gen_ai.output.text")}
    if content:
        assert texts["gen_ai.output.text"] == "The user is erin." and "Who is the user?" in texts[
            "gen_ai.input.messages"]
    else:
        assert texts == {}
        assert not any(text in str(v) for s in finished for v in s.attributes.values()
                       for text in ("Who is the user?", "hello", "erin"))
    # The answer belongs to the trace of the message that asked: marker -> firing -> prompt -> model.
    chain = _chain(chat, by_id)
    assert chain[:3] == ["chat gpt-test", "llm answer prompt_request", "append prompt_request"]
    assert chain[-3:] == ["scheduler decide", "append marker_added", "gateway ws message"]
    assert "executor run" in chain


async def test_a_stored_events_trace_lets_a_reader_of_the_log_continue_it(
    settings: Settings, nc: Any, spans: InMemorySpanExporter
) -> None:
    """Read from the log (no headers), an event's trace field is enough to parent a span on its append."""
    from petribus.events import Marker, MarkerAdded

    log = EventLog(nc)
    with tracing.span("writer") as writer:
        seq = await log.append(MarkerAdded(bot="counter", session_id="read-back",
                                           marker=Marker(location="Item", data={"n": 3})))
    [(read_seq, event)] = await log.read("counter", "read-back")
    assert read_seq == seq
    with tracing.span("reader", parent=event.trace):
        pass
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert finished["reader"].parent.span_id == finished["append marker_added"].context.span_id
    assert finished["append marker_added"].parent.span_id == writer.context.span_id
    assert finished["reader"].context.trace_id == writer.context.trace_id
