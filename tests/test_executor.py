"""The executor: runs firings in warm worker processes and puts exactly one outcome per firing in the log.

Every test runs a real nats-server and the scheduler; the executor runs in-process (its workers are
still processes) except in the fault test, which starts two executors as processes and kills one.
Tests wait on the session's log itself (an ordered JetStream consumer), never on a timer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from petribus import subjects
from petribus.bus import EventLog, WrongLastSequence
from petribus.core import SessionState, fold
from petribus.events import Event, Marker, MarkerAdded, PromptResponse, TransitionFired, TransitionStarted, decode
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_executor.app import Executor
from petribus_executor.firing import FiringRunner

from .conftest import app
from .harness import Stack

ORDER_BOT = f"{Path(__file__).parent.parent / 'examples' / 'order_bot.py'}:bot"
COUNTER = app("counter")
CASES = app("exec_cases")


class SessionLog:
    """One session's log as JetStream stores it, delivered event by event as it lands."""

    def __init__(self, nc: Any, bot: str, session_id: str | None = None) -> None:
        self.nc = nc
        self.bot = bot
        self.session_id = session_id or uuid.uuid4().hex
        self.events: list[tuple[int, Event]] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> SessionLog:
        self._sub = await self.nc.jetstream().subscribe(
            subjects.events(self.bot, self.session_id), ordered_consumer=True, cb=self._on_msg
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _on_msg(self, msg: Any) -> None:
        self.events.append((msg.metadata.sequence.stream, decode(msg.data)))
        self._changed.set()

    async def add(self, location: str, **data: Any) -> Marker:
        marker = Marker(location=location, data=data)
        await EventLog(self.nc).append(MarkerAdded(bot=self.bot, session_id=self.session_id, marker=marker))
        return marker

    async def add_many(self, location: str, items: list[dict[str, Any]]) -> list[Marker]:
        markers = [Marker(location=location, data=d) for d in items]
        await EventLog(self.nc).append_many(
            MarkerAdded(bot=self.bot, session_id=self.session_id, marker=m) for m in markers
        )
        return markers

    def of(self, type_: str, **fields: Any) -> list[Any]:
        return [e for _, e in self.events
                if e.type == type_ and all(getattr(e, k, None) == v for k, v in fields.items())]

    async def until(self, type_: str, count: int = 1, timeout: float = 30.0, **fields: Any) -> list[Any]:
        """Wait until the log holds ``count`` events of ``type_`` with ``fields``; return them."""
        async with asyncio.timeout(timeout):
            while len(found := self.of(type_, **fields)) < count:
                self._changed.clear()
                await self._changed.wait()
        return found

    async def state(self) -> SessionState:
        """The fold of the whole log, read back from the stream (the truth, not what we were sent)."""
        return fold(await EventLog(self.nc).read(self.bot, self.session_id))


def marking(state: SessionState) -> dict[str, list[dict[str, Any]]]:
    return {loc: [m.data for m in ms] for loc, ms in state.marking().items()}


def position(log: SessionLog, event: Any) -> int:
    return next(seq for seq, e in log.events if e is event)


async def test_order_bot_cancels_then_refunds_without_a_gateway(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [ORDER_BOT], parts=("scheduler", "executor")), \
            SessionLog(nc, "order_bot") as log:
        name = await log.add("UserName", name="alice")
        [refunded] = await log.until("transition_completed", transition="offer_refund")

    [fired] = log.of("transition_fired", transition="cancel_order")
    assert fired.consumed == [name.id]
    [started] = log.of("transition_started", firing_id=fired.firing_id)
    [said] = log.of("agent_message", firing_id=fired.firing_id)
    [cancelled] = log.of("transition_completed", firing_id=fired.firing_id)
    assert said.text == "Order cancelled for alice" and said.transition == "cancel_order"
    assert position(log, fired) < position(log, started) < position(log, said) < position(log, cancelled)
    assert started.attempt == 1 and f":{os.getpid()}." in started.executor
    assert [(m.location, m.data) for m in cancelled.outputs] == [
        ("OrderStatus", {"message": "order_cancelled for alice"})]
    assert cancelled.outputs[0].id == f"{fired.firing_id}.0"
    assert log.of("transition_fired", transition="offer_refund")[0].consumed == [cancelled.outputs[0].id]
    assert refunded.outputs[0].location == "RefundStatus"

    state = await log.state()
    assert marking(state) == {"RefundStatus": [{"message": "refund_offered"}]}
    assert not state.in_flight


async def test_a_hundred_markers_run_as_concurrent_firings(settings: Settings, nc: Any) -> None:
    workers = 25
    settings = settings.model_copy(update={"workers": workers})
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "counter") as log:
        await log.add_many("Item", [{"n": i, "sleep": 0.5} for i in range(100)])
        completed = await log.until("transition_completed", count=100, timeout=60)
        assert stack.services["executor"].workers.started <= workers  # warm workers, reused

    started = {e.firing_id: e.ts for e in log.of("transition_started")}
    spans = sorted((started[c.firing_id], c.ts) for c in completed)
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # an end sorts before a start
    running = overlap = 0
    for _, step in edges:
        running += step
        overlap = max(overlap, running)
    assert overlap >= workers // 2, f"at most {overlap} firings ran at once with {workers} workers"

    state = await log.state()
    assert sorted(d["n"] for d in marking(state)["Done"]) == list(range(100))
    assert set(marking(state)) == {"Done"}
    assert len({c.firing_id for c in completed}) == len(log.of("transition_completed")) == 100


async def test_a_transition_with_two_inputs_waits_for_both(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")), SessionLog(nc, "counter") as log:
        await log.add("Left", v=2)
        # The scheduler handles a session's events in order: once the Item's firing is done, it has
        # already seen the lone Left marker and (rightly) fired nothing for it.
        await log.add("Item", n=0)
        await log.until("transition_completed", transition="work")
        assert log.of("transition_fired", transition="join") == []

        await log.add("Right", v=40)
        [joined] = await log.until("transition_completed", transition="join")

    assert [(m.location, m.data) for m in joined.outputs] == [("Pair", {"total": 42})]
    assert marking(await log.state()) == {"Done": [{"n": 0}], "Pair": [{"total": 42}]}


async def test_async_and_sync_transitions_say_and_remember_before_they_complete(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [CASES], parts=("scheduler", "executor")), SessionLog(nc, "exec_cases") as log:
        await log.add("AsyncHello", name="ada")
        await log.add("SyncHello", name="bob")
        await log.until("transition_completed", count=2)

    for transition, text in (("greet_async", "hello ada, from a coroutine"),
                             ("greet_sync", "hello bob, from a function")):
        [done] = log.of("transition_completed", transition=transition)
        [said] = log.of("agent_message", firing_id=done.firing_id)
        assert said.text == text and said.transition == transition
        assert position(log, said) < position(log, done)
    [memory] = log.of("memory_updated")
    assert memory.memory == {"greeted": "ada", "how": "async"} and memory.transition == "greet_async"

    greeted = sorted(marking(await log.state())["Greeted"], key=lambda d: d["text"])
    assert greeted == [{"text": "hi ada", "tags": ["async", "ok"]}, {"text": "hi bob", "tags": ["sync"]}]


async def test_an_undeclared_output_fails_the_firing_and_returns_its_marker(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [CASES], parts=("scheduler", "executor")), SessionLog(nc, "exec_cases") as log:
        wrong = await log.add("Wrong", n=1)
        [failed] = await log.until("transition_failed", final=True)

    assert failed.transition == "wrong_output" and failed.error_type == "TransitionOutputError"
    assert "Greeted" in failed.error and not failed.retryable
    assert log.of("transition_completed") == []
    state = await log.state()
    assert [m.id for m in state.marking()["Wrong"]] == [wrong.id]
    assert not state.in_flight


async def test_a_failing_transition_is_retried_until_it_succeeds(
    settings: Settings, nc: Any, tmp_path: Path
) -> None:
    async with Stack(settings, [CASES], parts=("scheduler", "executor")), SessionLog(nc, "exec_cases") as log:
        await log.add("Flaky", counter=str(tmp_path / "attempts"), fail_times=2)
        [done] = await log.until("transition_completed", transition="flaky")

    assert [(f.attempt, f.final, f.error) for f in log.of("transition_failed")] == [
        (1, False, "flaky failure 1"), (2, False, "flaky failure 2")]
    assert [s.attempt for s in log.of("transition_started")] == [1, 2, 3]
    assert [m.data for m in done.outputs] == [{"attempts": 3, "note": ""}]


async def test_a_timed_out_firing_is_killed_and_the_executor_keeps_serving(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [CASES], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "exec_cases") as log:
        slow = await log.add("Slow", seconds=60)
        [failed] = await log.until("transition_failed", final=True, transition="slow")
        await log.add("SyncHello", name="after")
        [done] = await log.until("transition_completed", transition="greet_sync")
        workers = stack.services["executor"].workers

    assert failed.error_type == "TransitionTimeout" and "killed" in failed.error
    assert done.outputs[0].data == {"text": "hi after", "tags": ["sync"]}
    assert workers.started >= 2  # the killed worker was replaced, not reused
    assert [m.id for m in (await log.state()).marking()["Slow"]] == [slow.id]


async def test_context_prompt_is_a_request_in_the_log_answered_from_the_log(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [CASES], parts=("scheduler", "executor")), SessionLog(nc, "exec_cases") as log:
        await log.add("Ask", question="what now?")
        [asked] = await log.until("prompt_request", transition="ask")
        # Here the test answers as the LLM service would.
        await EventLog(nc).append(PromptResponse(bot="exec_cases", session_id=log.session_id, text="carry on",
                                                 request_id=asked.request_id, cause=asked.id))
        [done] = await log.until("transition_completed", transition="ask")

    assert asked.text == "what now?" and asked.wait and asked.request_id
    assert done.outputs[0].data["note"] == "carry on"


async def test_a_redelivery_of_a_firing_running_here_is_adopted_not_run_twice(
    settings: Settings, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lost_heartbeats(self: FiringRunner) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(FiringRunner, "_heartbeat", lost_heartbeats)
    settings = settings.model_copy(update={"ack_wait_s": 0.5})
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")), SessionLog(nc, "counter") as log:
        await log.add("Item", n=3, sleep=1.8)
        await log.until("transition_completed")

    assert len(log.of("transition_started")) == 1
    assert (await nc.jetstream().stream_info(subjects.WORK_STREAM)).state.messages == 0  # acked


async def test_work_for_an_unknown_transition_is_terminated_and_fails_for_good(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [COUNTER], parts=("executor",)), SessionLog(nc, "ghost") as log:
        item = WorkItem(bot="ghost", session_id=log.session_id, firing_id=uuid.uuid4().hex,
                        transition="haunt", inputs=[Marker(location="Boo", data={})], fired_seq=1)
        await nc.jetstream().publish(item.subject("cpu"), item.model_dump_json().encode())
        [failed] = await log.until("transition_failed", final=True)

    assert failed.firing_id == item.firing_id and failed.error_type == "UnknownTransition"
    assert "ghost" in failed.error and not failed.retryable


async def _dead_executor(js: Any) -> Any:
    """A pull subscription on the pool's work consumer that takes deliveries and never acks them: an
    executor that dies with each one (ack_wait 1 s)."""
    await js.add_consumer(subjects.WORK_STREAM, ConsumerConfig(
        durable_name=subjects.executor_durable("cpu"), filter_subject=subjects.work("cpu"),
        ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=-1))
    return await js.pull_subscribe_bind(subjects.executor_durable("cpu"), stream=subjects.WORK_STREAM)


async def test_a_firing_whose_runs_keep_dying_fails_for_good_and_its_marker_is_offered_again(
    settings: Settings, nc: Any
) -> None:
    settings = settings.model_copy(update={"max_deliver": 2, "ack_wait_s": 1.0})
    js = nc.jetstream()
    # An executor took the work and died before running it: the delivery is lost, but no run began,
    # so it must not count against the firing (as with deliveries lost to a bus outage).
    dead = await _dead_executor(js)
    async with Stack(settings, [COUNTER], parts=("scheduler",)), SessionLog(nc, "counter") as log:
        item = await log.add("Item", n=7)
        [taken] = await dead.fetch(1, timeout=10)
        work = WorkItem.model_validate_json(taken.data)
        assert work.inputs[0].id == item.id
        # Two runs that began and never ended: what executors killed mid-run leave in the log.
        for attempt in (1, 2):
            await EventLog(nc).append(TransitionStarted(
                bot="counter", session_id=log.session_id, firing_id=work.firing_id, transition="work",
                executor="dead-executor", attempt=attempt))
        async with Executor(settings, [COUNTER]):
            [failed] = await log.until("transition_failed", final=True)
            # Runs that died are not the transition's own failure: the marker is offered to it again.
            [done] = await log.until("transition_completed")
    await dead.unsubscribe()

    assert failed.firing_id == work.firing_id
    assert failed.error_type == "DeliveriesExhausted" and not failed.retryable and "2 runs" in failed.error
    [refired] = [f for f in log.of("transition_fired") if f.firing_id != work.firing_id]
    assert refired.consumed == [item.id] and done.firing_id == refired.firing_id
    assert marking(await log.state()) == {"Done": [{"n": 7}]}
    assert (await js.stream_info(subjects.WORK_STREAM)).state.messages == 0


async def test_a_delivery_that_never_started_a_run_does_not_count_against_the_firing(
    settings: Settings, nc: Any
) -> None:
    settings = settings.model_copy(update={"max_deliver": 1, "ack_wait_s": 1.0})
    js = nc.jetstream()
    dead = await _dead_executor(js)
    async with Stack(settings, [COUNTER], parts=("scheduler",)), SessionLog(nc, "counter") as log:
        await log.add("Item", n=8)
        for _ in range(3):  # three deliveries taken and dropped, as by executors cut off from the bus
            [taken] = await dead.fetch(1, timeout=10)
            assert taken.metadata.num_delivered >= 1
        async with Executor(settings, [COUNTER]):
            [done] = await log.until("transition_completed")
    await dead.unsubscribe()

    assert not log.of("transition_failed")
    [started] = log.of("transition_started")
    assert started.attempt == 4  # the fourth delivery, and the first run
    assert done.outputs[0].data == {"n": 8}


async def test_a_stopping_executor_finishes_its_running_firings_first(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "counter") as log:
        await log.add("Item", n=5, sleep=1.0)
        await log.until("transition_started")
        await stack.services["executor"].stop(timeout=10)
        stack.services.pop("executor")  # stopped already; the stack need not stop it again

        # The outcome is in the log by the time stop() returns, and the work was acked.
        stored = await EventLog(nc).read("counter", log.session_id)
        assert stored[-1][1].type == "transition_completed"
        assert (await nc.jetstream().stream_info(subjects.WORK_STREAM)).state.messages == 0


class ExecutorProcess:
    """``python -m petribus_executor`` as a child process, its log lines kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings: Settings, apps: list[str], *args: str, **env: str) -> ExecutorProcess:
        """``args`` go before the apps (default ``--workers 2``); ``env`` adds to the environment."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "petribus_executor", "--nats-url", settings.nats_url,
            *(args or ("--workers", "2")), *apps,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PETRIBUS_LOG_LEVEL": "info", **env},
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "executor started" in line:
                self.ready.set()

    def runs(self, executor_id: str) -> bool:
        return f":{self.proc.pid}." in executor_id

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._reader


@pytest.fixture
async def spawn_executor() -> Any:
    started: list[ExecutorProcess] = []

    async def spawn(settings: Settings, apps: list[str], **env: str) -> ExecutorProcess:
        ex = await ExecutorProcess.start(settings, apps, **env)
        started.append(ex)
        return ex

    yield spawn
    for ex in started:
        await ex.kill()


async def test_killed_executor_work_is_redelivered_and_completes_once(
    settings: Settings, nc: Any, spawn_executor: Callable[..., Any]
) -> None:
    executors = [await spawn_executor(settings, [COUNTER], PETRIBUS_ACK_WAIT_S="2") for _ in range(2)]
    async with asyncio.timeout(30):
        for ex in executors:
            await ex.ready.wait()

    async with Stack(settings, [COUNTER], parts=("scheduler",)), SessionLog(nc, "counter") as log:
        item = await log.add("Item", n=1, sleep=3.0)
        [first] = await log.until("transition_started")
        [victim] = [ex for ex in executors if ex.runs(first.executor)]
        await victim.kill()
        [done] = await log.until("transition_completed", timeout=30)

    [survivor] = [ex for ex in executors if ex is not victim]
    state = await log.state()
    events = [e for _, e in await EventLog(nc).read("counter", log.session_id)]

    def of(type_: str) -> list[Any]:
        return [e for e in events if e.type == type_]

    assert done.firing_id == first.firing_id
    assert len([c for c in of("transition_completed") if c.firing_id == first.firing_id]) == 1
    starts = [s for s in of("transition_started") if s.firing_id == first.firing_id]
    # Two runs: a third would mean the survivor's heartbeats failed to hold the work (3 s > ack_wait).
    assert len(starts) == 2, [s.value() for s in starts]
    assert any(s.attempt == 2 and survivor.runs(s.executor) for s in starts), [s.value() for s in starts]
    assert Counter(mid for f in of("transition_fired") for mid in f.consumed) == {item.id: 1}
    assert marking(state) == {"Done": [{"n": 1}]}
    assert not state.in_flight


async def test_fresh_work_runs_without_reading_the_log_and_any_other_delivery_reads_it(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "counter") as log:
        runner = stack.services["executor"].runner
        await log.add_many("Item", [{"n": n} for n in range(5)])
        await log.until("transition_completed", count=5)
        assert runner.fresh_runs == 5 and runner.folds.reads == 0  # the claim's own dispatch: no read
        # Each sent together with its claim, and run once the claim's republish said it was stored.
        assert stack.services["scheduler"].stats["sent_with_claim"] == 5 and runner.landed_runs == 5
        # The same work again (a rival scheduler, a lease check): first delivered, but not fresh.
        fired = log.of("transition_fired")[0]
        item = WorkItem(bot="counter", session_id=log.session_id, firing_id=fired.firing_id,
                        transition="work", inputs=[], fired_seq=position(log, fired))
        await nc.jetstream().publish(item.subject("cpu"), item.model_dump_json().encode(),
                                     headers={"Nats-Msg-Id": item.msg_id("again")})
        async with asyncio.timeout(30):
            while runner.folds.reads == 0:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    assert len(log.of("transition_started")) == 5  # it read the log, saw the firing ended, did not run it


async def test_work_sent_with_its_claim_runs_only_once_the_claim_is_stored(
    settings: Settings, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work sent together with its claim (``claim_pending``) runs only on a stored claim. Here no scheduler
    runs: the test sends the work, and appends the claims itself. A claim stored after the executor
    stopped waiting for its republish is found in the log on a later delivery, and the work runs once; work
    whose claim never lands (one refused: another claim was stored first) never runs, and is dropped once
    too old for its claim to land."""
    from petribus_executor import firing as firing_module

    monkeypatch.setattr(firing_module, "LANDED_WAIT_S", 0.2)
    monkeypatch.setattr(firing_module, "CLAIM_LANDS_WITHIN_S", 3.0)
    js = nc.jetstream()

    def pending(firing_id: str, marker: Marker) -> WorkItem:
        return WorkItem(bot="counter", session_id=log.session_id, firing_id=firing_id, transition="work",
                        inputs=[marker], fired_seq=0, fresh=True, claim_pending=True)

    async def send(item: WorkItem) -> None:
        await js.publish(item.subject("cpu"), item.model_dump_json().encode(), headers={"Nats-Msg-Id": item.msg_id()})

    async with Stack(settings, [COUNTER], parts=("executor",)) as stack, SessionLog(nc, "counter") as log:
        runner = stack.services["executor"].runner
        late, orphaned = await log.add("Item", n=1), await log.add("Item", n=2)
        await send(pending("late-claim", late))
        await send(pending("never-claimed", orphaned))
        async with asyncio.timeout(10):  # both first deliveries waited for a republish, then read the log
            while runner.claims_awaited < 2:
                await asyncio.sleep(0.02)
        assert not log.of("transition_started")
        await EventLog(nc).append(
            TransitionFired(bot="counter", session_id=log.session_id, firing_id="late-claim", transition="work",
                            consumed=[late.id]),
            expected_last_seq=0, kind="transition_fired", msg_id="fire:late-claim")
        [done] = await log.until("transition_completed", timeout=20)
        async with asyncio.timeout(20):  # dropped once older than a claim could still land after
            while (await js.stream_info(subjects.WORK_STREAM,
                                        subjects_filter=f"{subjects.WORK_PREFIX}.>")).state.messages:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    assert done.firing_id == "late-claim" and done.outputs[0].data == {"n": 1}
    assert [s.firing_id for s in log.of("transition_started")] == ["late-claim"]  # the orphan never ran
    assert runner.landed_runs == 0 and runner.claims_awaited >= 3


async def test_a_stored_claim_is_republished_with_its_sequence_and_a_refused_one_is_not(nc: Any) -> None:
    await check_claims_republished(nc, stored_within_s=5)


async def check_claims_republished(nc: Any, *, stored_within_s: float) -> None:
    """What an executor runs work sent with its claim on (petribus_executor.landed): a stored claim's
    republish, with its sequence; a refused claim has none. Also run against a three-node cluster."""
    from petribus.bus import claims_republished
    from petribus_executor.landed import Landed

    assert await claims_republished(nc.jetstream())
    landed = Landed(nc)
    await landed.start()
    log = EventLog(nc)

    def claim(firing_id: str) -> TransitionFired:
        return TransitionFired(bot="b", session_id="republished", firing_id=firing_id, transition="t", consumed=[])

    seq = await log.append(claim("f1"), expected_last_seq=0, kind="transition_fired", msg_id="fire:f1")
    assert await landed.wait("f1", stored_within_s) == seq
    with pytest.raises(WrongLastSequence):  # another claim was stored since the one this was decided on
        await log.append(claim("f2"), expected_last_seq=0, kind="transition_fired", msg_id="fire:f2")
    assert await landed.wait("f2", 1.0) is None
    assert landed.seq("f1") == seq


async def test_a_scoped_executor_is_sent_only_its_bots_claims(nc: Any) -> None:
    """A deployed version's executor serves one bot (``--scoped``): it subscribes to that bot's claims."""
    from petribus_executor.landed import Landed

    landed = Landed(nc, "mine")
    await landed.start()
    log = EventLog(nc)
    seqs = {}
    for bot in ("theirs", "mine"):
        seqs[bot] = await log.append(
            TransitionFired(bot=bot, session_id="scoped", firing_id=f"{bot}-f", transition="t", consumed=[]),
            expected_last_seq=0, kind="transition_fired", msg_id=f"fire:{bot}-f")
    assert await landed.wait("mine-f", 5) == seqs["mine"]
    assert landed.seq("theirs-f") is None  # stored before "mine-f", so it would have come first
