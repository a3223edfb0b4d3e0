"""``petribus.client`` against the real stack: sessions, typed events resumed across a gateway restart,
people's answers, runs to a halt (after and before), the state at a sequence, forks, and the sync face."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from petribus.bus import EventLog
from petribus.client import Client, Conflict, Event, Invalid, NotFound, RunFailed, SyncClient
from petribus.events import Marker, MarkerAdded

from .conftest import app
from .harness import Stack, session_state

CHAIN = app("client_chain")
HITL = app("hitl_bot")
PARTS = ("scheduler", "executor", "gateway")


class Order(BaseModel):  # the client needs no import of the bot: a model of the location's name will do
    id: int


class Boom(BaseModel):
    why: str


@pytest.fixture
async def stack(settings, nc) -> AsyncIterator[Stack]:
    async with Stack(settings, [CHAIN, HITL], parts=PARTS) as s:
        yield s


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    async with Client(stack.gateway.url) as c:
        yield c


async def _until(stream: AsyncIterator[Event], done, seen: list[Event] | None = None) -> Event:
    """Read ``stream`` until an event satisfies ``done``; return it (each event read goes to ``seen``)."""
    async with asyncio.timeout(60):
        async for event in stream:
            if seen is not None:
                seen.append(event)
            if done(event):
                return event
    raise AssertionError("the stream ended")


def _completed(transition: str, count: int = 1):
    left = [count]

    def done(event: Event) -> bool:
        if event.type == "transition_completed" and event.transition == transition:
            left[0] -= 1
        return left[0] == 0

    return done


async def test_a_session_takes_models_dicts_and_words_and_streams_typed_events(client, nc):
    s = await client.session("client_chain")
    assert s.session_id
    by_model = await s.add(Order(id=1))
    by_name = await s.add("Order", {"id": 2})
    said = await s.say("hi")
    with pytest.raises(Invalid, match="id"):
        await s.add("Order", {"id": "not a number"})
    with pytest.raises(Invalid):
        await s.add("NoSuchPlace", {})

    assert (by_model.type, by_model.value["location"], by_model.value["data"]) == ("marker_added", "Order", {"id": 1})
    assert by_name.value["data"] == {"id": 2} and said.type == "user_message" and said.value == "hi"
    assert by_model.seq < by_name.seq < said.seq

    seen: list[Event] = []
    async with s.events() as stream:
        await _until(stream, _completed("refund", 2), seen)
    assert seen[0].type == "session_created" and seen[0].value == s.session_id
    assert [e.seq for e in seen if e.type == "marker_added"] == [by_model.seq, by_name.seq]
    completed = [e for e in seen if e.type == "transition_completed"]
    assert sorted(e.transition for e in completed) == ["check"] * 2 + ["offer_refund"] * 2 + ["refund"] * 2
    assert all(e.task_id and e.session_id == s.session_id for e in completed)
    _, log = await session_state(nc, "client_chain", s.session_id)
    assert [e.seq for e in seen] == [seq for seq, _ in log][:len(seen)]  # each once, in order
    refunded = sorted((await s.state()).data("Refunded"), key=lambda d: d["id"])
    assert refunded == [{"id": 1, "amount": 10}, {"id": 2, "amount": 20}]


async def test_an_unknown_session_is_not_found_by_rest_or_stream(client):
    s = client.session("client_chain", session_id="no-such-session")
    with pytest.raises(NotFound):
        await s.state()
    seen: list[Event] = []
    with pytest.raises(NotFound, match="no-such-session"):
        async with s.events() as stream:
            async for event in stream:  # the refusal comes as an error event, then the stream ends with it
                seen.append(event)
    assert [e.error_code for e in seen] == ["unknown_session"]
    with pytest.raises(NotFound):
        await client.session("no_such_bot")


async def test_closing_the_client_ends_the_streams_it_opened(stack):
    async with Client(stack.gateway.url) as client:
        s = await client.session("client_chain")
        stream = s.events()  # left open, as a loop that breaks out early leaves it
        assert (await anext(stream)).type == "session_created"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_events_resume_after_the_gateway_restarts_with_no_seq_missed_or_repeated(settings, nc):
    from petribus.loader import load_net
    from petribus_gateway.app import Gateway

    with socket.socket() as sock:  # a fixed port, so the restarted gateway is where the stream left it
        sock.bind(("127.0.0.1", 0))
        settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    net = load_net(CHAIN)
    log = EventLog(nc)
    async with Stack(settings, [CHAIN], parts=("scheduler", "executor")):
        gateway = Gateway(settings, [net])
        await gateway.start()
        async with Client(gateway.url) as client:
            s = await client.session("client_chain")
            stream = s.events()
            seen: list[Event] = []
            try:
                await s.add(Order(id=1))
                await _until(stream, _completed("refund"), seen)
                before_drop = seen[-1].seq
                await gateway.stop()  # closes the stream's socket (1012)
                for n in (2, 3):  # events land while no gateway is there to stream them
                    await log.append(MarkerAdded(bot="client_chain", session_id=s.session_id, source="api",
                                                 marker=Marker(location="Order", data={"id": n})))
                await log.wait_for("client_chain", s.session_id, after=before_drop, timeout=60,
                                   match=lambda ev: ev.type == "transition_completed" and any(
                                       m.data == {"id": 3, "amount": 30} for m in ev.outputs))
                gateway = Gateway(settings, [net])
                await gateway.start()
                await _until(stream, _completed("refund", 2), seen)
            finally:
                await stream.close()
                await gateway.stop()

    assert stream.reconnects == 1  # the connection really dropped and was resumed once
    _, events = await session_state(nc, "client_chain", s.session_id)
    seqs = [e.seq for e in seen]
    assert seqs == [seq for seq, _ in events][:len(seen)]  # none missed, none repeated, in order
    assert any(seq > before_drop for seq in seqs)
    outage = [e for e in seen if e.type == "marker_added" and e.seq > before_drop]
    assert [e.value["data"] for e in outage] == [{"id": 2}, {"id": 3}]


async def test_a_write_refused_during_a_bus_outage_is_sent_again_with_its_key_and_lands_once(
        settings, nats_server, nc):
    from .test_gateway_outage import _restart, _stop

    short = settings.model_copy(update={"bus_outage_s": 1.0})  # the gateway answers 503 a second into it
    async with Stack(short, [CHAIN], parts=("gateway",)) as stack, Client(stack.gateway.url) as client:
        s = await client.session("client_chain")
        sent: list[tuple[str | None, int]] = []
        refused = asyncio.Event()

        async def record(resp) -> None:
            sent.append((resp.request.headers.get("Idempotency-Key"), resp.status_code))
            if resp.status_code == 503:
                refused.set()

        client.rest.http.event_hooks["response"].append(record)
        await _stop(nats_server, stack)
        try:
            saying = asyncio.create_task(s.say("hello"))
            await asyncio.wait_for(refused.wait(), 60)
        finally:
            _restart(nats_server)
        said = await saying

    keys, statuses = zip(*sent, strict=True)
    assert statuses[0] == 503 and statuses[-1] == 201 and len(set(keys)) == 1 and keys[0]
    _, log = await session_state(nc, "client_chain", s.session_id)
    assert [(seq, ev.text) for seq, ev in log if ev.type == "user_message"] == [(said.seq, "hello")]


async def test_people_answer_confirmations_questions_and_file_requests(client, nc, tmp_path):
    s = await client.session("hitl")
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 1000)
    async with s.events() as stream:
        await s.add("Order", {"id": 1})
        asked = await _until(stream, lambda e: e.type == "confirm_transition")
        accepted = await s.accept(asked.task_id)
        assert (asked.transition, accepted.type, accepted.task_id) == ("cancel", "accept_transition", asked.task_id)
        await _until(stream, _completed("cancel"))
        with pytest.raises(Conflict):
            await s.accept(asked.task_id)

        await s.add("Ticket", {"id": 2})
        asked = await _until(stream, lambda e: e.type == "confirm_transition")
        rejected = await s.reject(asked.task_id, "not now")
        assert (asked.transition, rejected.value["reason"]) == ("escalate", "not now")
        await _until(stream, _completed("close"))

        await s.add("Refund", {"amount": 30})
        question = await _until(stream, lambda e: e.type == "confirm_request")
        answered = await s.answer(question.request_id, True)
        assert answered.type == "confirm_response" and answered.request_id == question.request_id
        await _until(stream, _completed("refund"))
        with pytest.raises(NotFound):
            await s.answer("no-such-question", True)

        await s.add("Upload", {"description": "the report"})
        wanted = await _until(stream, lambda e: e.type == "input_file_request")
        uploaded = await s.upload(wanted.value["file_id"], source)
        assert (uploaded.name, uploaded.size) == ("report.txt", source.stat().st_size)
        sent = await _until(stream, lambda e: e.type == "output_file")
        saved = await s.download(sent.value["url"], tmp_path / "back.txt")
        await _until(stream, _completed("echo_file"))

    assert saved.read_bytes() == source.read_bytes()
    with pytest.raises(NotFound):
        await s.download("0" * 32, tmp_path / "nothing")
    state = await s.state()
    assert state.counts() == {"Cancelled": 1, "Closed": 1, "RefundDecision": 1, "Received": 1}
    assert state.data("RefundDecision") == [{"amount": 30, "approved": True}]


async def test_run_halts_after_a_transition_completes_and_counts_only_what_follows(client):
    s = await client.session("client_chain")
    first = await s.run(halt_after=["offer_refund"], add=[Order(id=1)])
    assert (first.halted, first.transition) == ("after", "offer_refund")
    assert first.event.value["outputs"][0]["data"] == {"id": 1, "amount": 10}
    then = await first.state()
    assert then.last_seq == first.seq and then.data("Offer") == [{"id": 1, "amount": 10}]
    assert "Refunded" not in then.counts()

    # Order 1's offer_refund is in the past now: only order 2's counts.
    second = await s.run(halt_after=["offer_refund"], add=[Order(id=2)])
    assert second.seq > first.seq and second.event.value["outputs"][0]["data"] == {"id": 2, "amount": 20}
    done = await s.run(halt_after=["refund"], since=first.seq)  # from an earlier point: nothing is missed
    assert done.seq > first.seq and done.transition == "refund"


async def test_run_raises_when_the_transition_it_waits_for_fails_for_good(client):
    s = await client.session("client_chain")
    with pytest.raises(RunFailed, match="went wrong here") as failed:
        await s.run(halt_after=["explode"], add=[Boom(why="went wrong here")])
    assert failed.value.event.transition == "explode" and failed.value.event.final


async def test_run_halts_before_a_transition_and_the_held_firing_waits_for_accept(client):
    s = await client.session("client_chain")
    held = await s.run(halt_before=["refund"], add=[Order(id=3)])
    assert (held.halted, held.event.type, held.transition) == ("before", "confirm_transition", "refund")
    at_halt = await held.state()
    [waiting] = at_halt.in_flight
    assert (waiting["firing_id"], waiting["status"]) == (held.task_id, "awaiting_confirmation")
    assert "Refunded" not in (await s.state()).counts()  # held: it does not run on its own

    accepted = await s.accept(held.task_id)
    done = await s.run(halt_after=["refund"], since=accepted.seq)
    assert done.task_id == held.task_id
    assert (await s.state()).data("Refunded") == [{"id": 3, "amount": 30}]

    # The halt stays set, like a breakpoint, until it is cleared.
    again = await s.run(halt_before=["refund"], add=[Order(id=4)])
    await s.halt([])
    await s.reject(again.task_id)
    unheld = await s.run(halt_after=["refund"], add=[Order(id=5)])
    assert unheld.event.value["outputs"][0]["data"] == {"id": 5, "amount": 50}


async def test_state_at_a_sequence_and_a_fork_from_it(client):
    s = await client.session("client_chain")
    offered = await s.run(halt_after=["offer_refund"], add=[Order(id=7)])
    await s.run(halt_after=["refund"], since=offered.seq)
    assert (await s.state(at=offered.seq)).data("Offer") == [{"id": 7, "amount": 70}]
    with pytest.raises(Invalid):
        await s.state(at=0)  # sequences start at 1

    fork = await s.fork(at=offered.seq)
    assert fork.session_id != s.session_id and fork.bot == "client_chain"
    async with fork.events() as stream:
        first = await anext(stream)
        await _until(stream, _completed("refund"))
    assert first.type == "session_forked" and first.value["source_seq"] == offered.seq
    assert (await fork.state()).data("Refunded") == [{"id": 7, "amount": 70}]
    steps = [step async for step in s.history()]
    assert [step.seq for step in steps] == [e.seq for e in (await s.state()).events]
    assert any(m.data == {"id": 7} for step in steps for m in step.consumed)


async def test_the_sync_client_runs_a_session_from_a_thread(stack):
    def script(url: str) -> dict:
        with SyncClient(url) as sync:
            s = sync.session("client_chain")
            done = s.run(halt_after=["refund"], add=[("Order", {"id": 9})])
            kinds = []
            for event in s.events():
                kinds.append(event.type)
                if event.seq == done.seq:
                    break
            state = s.state()
            return {"kinds": kinds, "counts": state.counts(), "transition": done.transition,
                    "steps": [step.seq for step in s.history(page=2)], "seqs": [e.seq for e in state.events]}

    ran = await asyncio.to_thread(script, stack.gateway.url)
    assert ran["kinds"][0] == "session_created" and ran["kinds"].count("transition_completed") == 3
    assert ran["counts"] == {"Refunded": 1} and ran["transition"] == "refund"
    assert ran["steps"] == ran["seqs"]  # every page of two followed to the end


def test_importing_petribus_or_its_client_imports_no_service():
    code = ("import sys, petribus; assert 'petribus.client' not in sys.modules; import petribus.client; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('petribus_gateway', 'petribus_scheduler', "
            "'petribus_executor', 'petribus_llm', 'petribus_cli', 'nats', 'fastapi')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


async def test_run_halt_after_on_the_order_bot(settings, nc):
    """The README's order bot, driven by the client: add alice, run until offer_refund completes."""
    order_bot = f"{Path(__file__).parent.parent / 'examples' / 'order_bot.py'}:bot"

    class UserName(BaseModel):
        name: str

    async with Stack(settings, [order_bot], parts=PARTS) as stack, Client(stack.gateway.url) as client:
        s = await client.session("order_bot")
        done = await s.run(halt_after=["offer_refund"], add=[UserName(name="alice")])
        assert done.event.type == "transition_completed" and done.event.transition == "offer_refund"
        state = await done.state()
        assert {loc: [m.data for m in ms] for loc, ms in state.marking.items()} == {
            "RefundStatus": [{"message": "refund_offered"}]}
        said = [e.value for e in state.events if e.type == "agent_message"]
        assert said == ["Order cancelled for alice", "A refund has been offered (order_cancelled for alice)"]
