"""Prometheus metrics (docs/metrics.md): scraped before and after a run over the real stack, the counters
moved by exactly what the run did; a service's metrics port serves the same; consumer counts come from
JetStream and are cached; /metrics needs an admin key while keys are required."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from petribus import keys, metrics, subjects
from petribus.settings import Settings
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from .conftest import app
from .harness import Client, Stack
from .scripted_llm import USAGE, ScriptedLLM, fail, say
from .test_cli import ORDER_BOT, START_S, petribus  # noqa: F401  (petribus: the fixture)

APP = app("metrics_app")
BOT = "metrics_app"
MODEL = "gpt-test"
N_OK, N_BAD = 5, 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(url, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


async def until_scraped(url: str, check: Any) -> Samples:
    """Scrape until ``check(samples)`` holds: a gauge follows what happened a moment later."""
    async with asyncio.timeout(20):
        while not check(samples := await scrape(url)):
            await asyncio.sleep(0.05)
    return samples


async def until_seen(client: Client, want: Counter[tuple[str, str | None]]) -> None:
    """Receive until ``want`` (event type, transition) counts were seen."""
    seen: Counter[tuple[str, str | None]] = Counter()
    async with asyncio.timeout(60):
        while any(seen[k] < n for k, n in want.items()):
            event = await client.recv()
            seen[event["type"], event["metadata"].get("transition_name")] += 1


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM() as server:
        yield server


def _with_model(settings: Settings, llm: ScriptedLLM, **update: Any) -> Settings:
    return settings.model_copy(update={"openai_api_key": SecretStr("sk-test"),
                                       "openai_base_url": llm.base_url, **update})


async def test_counters_move_by_exactly_what_a_run_did(settings: Settings, llm: ScriptedLLM) -> None:
    llm.when("what is the gate for", say("For counting."))  # first: a prompt's request quotes the chat too
    llm.when("hello metrics", say("Hello back."))
    llm.when("break please", fail(400, "scripted bad request"))
    async with Stack(_with_model(settings, llm), [APP]) as stack:
        url = f"{stack.gateway.url}/metrics"
        before = await scrape(url)
        client = await Client.connect(stack.ws_url(BOT))
        created = await client.until("session_created")
        session_id = created["value"]
        open_now = await scrape(url)
        assert moved(open_now, before, "petribus_websocket_clients", bot=BOT) == 1

        for n in range(N_OK):
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": n}}})
        for n in range(N_BAD):
            await client.send({"type": "marker_added", "value": {"location": "Bad", "data": {"n": n}}})
        await until_seen(client, Counter({("transition_completed", "tick"): N_OK,
                                          ("transition_failed", "boom"): N_BAD}))

        # A confirm=True firing is in flight from its claim until it ends: the session is active meanwhile.
        await client.send({"type": "marker_added", "value": {"location": "Gate", "data": {"n": 1}}})
        asked = await client.until("confirm_transition")
        await until_scraped(url, lambda s: value(s, "petribus_sessions_active", bot=BOT) == 1)
        await client.send({"type": "accept_transition", "value": asked["metadata"]["task_id"]})
        await until_seen(client, Counter({("transition_completed", "gate"): 1}))
        await until_scraped(url, lambda s: value(s, "petribus_sessions_active", bot=BOT) == 0)

        # The model: a streamed chat reply, a refused request, and a transition's prompt (not streamed).
        await client.send({"type": "user_message", "value": "hello metrics", "request_id": "r1"})
        await client.until(lambda e: e["type"] == "agent_message" and e["metadata"]["request_id"] == "r1")
        await client.send({"type": "user_message", "value": "break please", "request_id": "r2"})
        await client.until(lambda e: e["type"] == "error" and e["metadata"]["request_id"] == "r2")
        await client.send({"type": "marker_added", "value": {"location": "Question",
                                                             "data": {"text": "what is the gate for"}}})
        await until_seen(client, Counter({("transition_completed", "ask"): 1}))
        after = await scrape(url)
        await client.close()
        closed = await until_scraped(url, lambda s: value(s, "petribus_websocket_clients", bot=BOT)
                                     == value(before, "petribus_websocket_clients", bot=BOT))

    assert session_id and closed
    for transition, runs in (("tick", N_OK), ("boom", N_BAD), ("gate", 1), ("ask", 1)):
        assert moved(after, before, "petribus_firings_started_total", bot=BOT, transition=transition) == runs
        assert moved(after, before, "petribus_firing_queue_wait_seconds_count", bot=BOT,
                     transition=transition) == runs
    assert moved(after, before, "petribus_firings_completed_total", bot=BOT, transition="tick") == N_OK
    assert moved(after, before, "petribus_firings_completed_total", bot=BOT, transition="boom") == 0
    failed = "petribus_firings_failed_total"
    assert moved(after, before, failed, bot=BOT, transition="boom", final="true") == N_BAD
    assert moved(after, before, failed, bot=BOT, transition="boom", final="false") == 0
    assert moved(after, before, failed, bot=BOT, transition="tick", final="true") == 0
    assert moved(after, before, "petribus_firing_duration_seconds_count", bot=BOT, transition="tick",
                 outcome="ok") == N_OK
    assert moved(after, before, "petribus_firing_duration_seconds_count", bot=BOT, transition="boom",
                 outcome="error") == N_BAD
    assert moved(after, before, "petribus_firing_duration_seconds_bucket", bot=BOT, transition="tick",
                 outcome="ok", le="+Inf") == N_OK
    assert moved(after, before, "petribus_scheduler_firings_claimed_total") == N_OK + N_BAD + 2
    assert ("petribus_scheduler_claim_conflicts_total", frozenset()) in after
    for stream, consumer in ((subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE),
                             (subjects.EVENTS_STREAM, subjects.LLM_DURABLE),
                             (subjects.WORK_STREAM, subjects.executor_durable("cpu"))):
        for name in ("pending", "ack_pending", "redelivered"):
            assert (f"petribus_consumer_{name}_messages",
                    frozenset({"stream": stream, "consumer": consumer}.items())) in after

    ok = sum(1 for r in llm.requests if r.status == 200)
    refused = sum(1 for r in llm.requests if r.status != 200)
    assert ok >= 2 and refused == 1  # at least the chat reply and the prompt; the refusal is not retried
    streamed = [bool(r.body.get("stream")) for r in llm.requests]
    assert True in streamed and False in streamed  # usage is read from both kinds of answer
    assert moved(after, before, "petribus_llm_requests_total", bot=BOT, model=MODEL, outcome="ok") == ok
    assert moved(after, before, "petribus_llm_requests_total", bot=BOT, model=MODEL, outcome="error") == 1
    assert moved(after, before, "petribus_llm_request_duration_seconds_count", bot=BOT, model=MODEL) == ok + 1
    assert moved(after, before, "petribus_llm_tokens_total", bot=BOT, model=MODEL,
                 kind="prompt") == ok * USAGE["prompt_tokens"]
    assert moved(after, before, "petribus_llm_tokens_total", bot=BOT, model=MODEL,
                 kind="completion") == ok * USAGE["completion_tokens"]
    assert moved(after, before, "petribus_llm_prompts_answered_total") == 1


async def test_a_services_metrics_port_serves_the_same_metrics(settings: Settings) -> None:
    async with Stack(settings.model_copy(update={"metrics_port": 0}), [APP]) as stack:
        [server] = {id(s.metrics_server): s.metrics_server for s in stack.services.values()}.values()
        assert server is not None and server.users == len(stack.services)  # one endpoint per process
        before = await scrape(server.url)
        client = await Client.connect(stack.ws_url(BOT))
        await client.until("session_created")
        for n in range(2):
            await client.send({"type": "marker_added", "value": {"location": "Item", "data": {"n": n}}})
        await until_seen(client, Counter({("transition_completed", "tick"): 2}))
        await client.close()
        from_port = await scrape(server.url)
        from_gateway = await scrape(f"{stack.gateway.url}/metrics")
        async with httpx.AsyncClient(timeout=10) as http:
            elsewhere = await http.get(server.url.replace("/metrics", "/other"))
        url = server.url

    assert moved(from_port, before, "petribus_firings_completed_total", bot=BOT, transition="tick") == 2
    assert {name for name, _ in from_port} == {name for name, _ in from_gateway}
    assert elsewhere.status_code == 404
    with pytest.raises(httpx.ConnectError):  # closed with the process's last service
        await scrape(url)


class _Executor:
    """Just what the metrics read of an executor: its name, pools, bus and settings."""

    name = "executor"

    def __init__(self, js: Any, pools: list[str], settings: Settings) -> None:
        self.js, self.pools, self.settings = js, pools, settings
        self.metrics_server = None


async def test_consumer_counts_come_from_jetstream_and_are_cached(
    settings: Settings, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = nc.jetstream()
    durable = subjects.executor_durable("mtest")
    await js.add_consumer(subjects.WORK_STREAM, ConsumerConfig(
        durable_name=durable, filter_subject=subjects.work("mtest"), ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30))
    for n in range(3):
        await js.publish(f"pb.work.mtest.{BOT}.s1.f{n}", b"{}")
    labels = {"stream": subjects.WORK_STREAM, "consumer": durable}
    fake = _Executor(js, ["mtest"], settings)
    await metrics.watch(fake)
    try:
        monkeypatch.setattr(metrics, "CONSUMER_INFO_TTL_S", 0.0)
        first = parse((await metrics.render()).decode())
        sub = await js.pull_subscribe(subjects.work("mtest"), durable=durable, stream=subjects.WORK_STREAM)
        [taken] = await sub.fetch(1, timeout=5)
        held = parse((await metrics.render()).decode())
        await taken.nak()
        again = []
        while len(again) < 3:  # the one nak'ed comes back too, maybe in a later batch
            again += await sub.fetch(3 - len(again), timeout=5)
        redelivered = parse((await metrics.render()).decode())
        monkeypatch.setattr(metrics, "CONSUMER_INFO_TTL_S", 3600.0)
        for msg in again:
            await msg.ack()
        cached = parse((await metrics.render()).decode())  # within the TTL: NATS is not asked again
    finally:
        await metrics.unwatch(fake)

    assert value(first, "petribus_consumer_pending_messages", **labels) == 3
    assert value(held, "petribus_consumer_pending_messages", **labels) == 2
    assert value(held, "petribus_consumer_ack_pending_messages", **labels) == 1
    assert sorted(m.metadata.num_delivered for m in again) == [1, 1, 2]
    assert value(redelivered, "petribus_consumer_redelivered_messages", **labels) == 1
    assert value(redelivered, "petribus_consumer_ack_pending_messages", **labels) == 3
    assert value(redelivered, "petribus_consumer_pending_messages", **labels) == 0
    assert value(cached, "petribus_consumer_ack_pending_messages", **labels) == 3
    after = parse((await metrics.render()).decode())
    assert ("petribus_consumer_pending_messages", frozenset(labels.items())) not in after  # no longer watched


async def test_metrics_need_an_admin_key_while_keys_are_required(settings: Settings, nc: Any) -> None:
    js = nc.jetstream()
    admin, _ = await keys.create(js, "ops", admin=True)
    alice, _ = await keys.create(js, "alice")
    async with Stack(settings, [APP], parts=("gateway",)) as stack:
        url = f"{stack.gateway.url}/metrics"
        async with httpx.AsyncClient(timeout=10) as http:
            anonymous = await http.get(url)
            not_admin = await http.get(url, headers={"Authorization": f"Bearer {alice}"})
            forged = await http.get(url, headers={"Authorization": "Bearer pb_not_a_key"})
        scraped = await scrape(url, admin)

    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized"
    assert not_admin.status_code == 403 and not_admin.json()["code"] == "forbidden"
    assert forged.status_code == 401
    assert any(name == "petribus_scheduler_claim_conflicts_total" for name, _ in scraped)


async def test_serve_reports_its_child_executors_firings(petribus: Any, tmp_path: Any) -> None:  # noqa: F811
    # serve runs the executor in a process of its own; its gateway's /metrics still has the firings, once.
    serve = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1",
                     "--data-dir", tmp_path / "data", env={"PETRIBUS_METRICS_PORT": "0"})
    ws_url = serve.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S).group(1)
    url = ws_url.replace("ws://", "http://").split("/bots/")[0] + "/metrics"
    before = await scrape(url)
    client = await Client.connect(ws_url)
    await client.until("session_created")
    await client.send({"type": "marker_added", "value": {"location": "UserName", "data": {"name": "alice"}}})
    await client.until(lambda e: e["type"] == "transition_completed"
                       and e["metadata"]["transition_name"] == "offer_refund", timeout=60)
    await client.close()
    after = await scrape(url)
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    assert serve.stop() == 0, serve.output()

    labels = {"bot": "order_bot", "transition": "offer_refund"}
    assert moved(after, before, "petribus_firings_completed_total", **labels) == 1
    assert moved(after, before, "petribus_firing_duration_seconds_count", outcome="ok", **labels) == 1
    assert moved(after, before, "petribus_scheduler_firings_claimed_total") >= 1  # this process's own
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) and "process_cpu_seconds_total" in types  # every family once


def test_a_childs_metrics_are_added_to_this_processs() -> None:
    child = ('# TYPE petribus_firings_started_total counter\n'
             'petribus_firings_started_total{bot="b",transition="t"} 3.0\n'
             '# TYPE petribus_firings_started_created gauge\n'
             'petribus_firings_started_created{bot="b",transition="t"} 1.0\n'
             '# TYPE petribus_scheduler_firings_claimed_total counter\n'
             'petribus_scheduler_firings_claimed_total 0.0\n'
             '# TYPE process_cpu_seconds_total counter\n'
             'process_cpu_seconds_total 123456789.0\n')  # no real process has used that much
    own = parse(metrics.generate_latest(metrics.REGISTRY).decode())
    merged = parse(metrics.generate_latest(metrics._Merged(metrics.REGISTRY, [child, child])).decode())

    started = ("petribus_firings_started_total", frozenset({"bot": "b", "transition": "t"}.items()))
    assert merged[started] == own.get(started, 0.0) + 6
    assert merged[("petribus_firings_started_created", started[1])] <= 1.0
    claimed = ("petribus_scheduler_firings_claimed_total", frozenset())
    assert merged[claimed] == own[claimed]
    cpu = ("process_cpu_seconds_total", frozenset())
    assert merged[cpu] < 123456789.0 and merged[cpu] >= own[cpu]  # this process's (now), not the child's
    text = metrics.generate_latest(metrics._Merged(metrics.REGISTRY, [child])).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # the child's series went into this process's families
