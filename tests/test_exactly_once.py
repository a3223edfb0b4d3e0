"""A firing's effects land once however often it runs: kill -9 mid-run, re-dispatch at any age, retries."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.events import AgentMessage, ConfirmResponse, Marker, MarkerAdded, MemoryUpdated, TransitionFired
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_executor.effects import Effect
from petribus_executor.firing import FiringRunner

from .conftest import app
from .harness import Stack
from .test_executor import ExecutorProcess, SessionLog

EFFECTS = app("effects")


@pytest.fixture
async def executor_process(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Start ``python -m petribus_executor ARGS effects`` (to be killed with SIGKILL), once it serves."""
    started: list[ExecutorProcess] = []

    async def spawn(*args: str, **env: str) -> ExecutorProcess:
        ex = await ExecutorProcess.start(settings, [EFFECTS], *args, **env)
        started.append(ex)
        async with asyncio.timeout(60):
            await ex.ready.wait()
        return ex

    yield spawn
    for ex in started:
        await ex.kill()


async def _raw(nc: Any, session_id: str) -> list[Any]:
    return [e for _, e in await EventLog(nc).read("effects", session_id)]


async def test_a_killed_executors_firings_say_and_remember_once_and_consume_once(
    settings: Settings, nc: Any, executor_process: Callable[..., Any]
) -> None:
    first = await executor_process(PETRIBUS_ACK_WAIT_S="2")
    async with Stack(settings, [EFFECTS], parts=("scheduler",)), SessionLog(nc, "effects") as log:
        chores = await log.add_many("Chore", [{"n": n, "sleep": 3.0} for n in range(200)])
        await log.until("agent_message", count=200, timeout=60)
        await first.kill()
        # The fault hit mid-run: every firing had said its piece, none had finished.
        assert not log.of("transition_completed")
        await executor_process(PETRIBUS_ACK_WAIT_S="2")
        await log.until("transition_completed", count=200, timeout=90)

    events = await _raw(nc, log.session_id)
    said = Counter(e.text for e in events if isinstance(e, AgentMessage))
    assert said == Counter({f"chore {n} under way": 1 for n in range(200)})
    remembered = Counter(e.memory["chore"] for e in events if isinstance(e, MemoryUpdated))
    assert remembered == Counter(range(200))
    consumed = Counter(mid for e in events if isinstance(e, TransitionFired) for mid in e.consumed)
    assert consumed == Counter({m.id: 1 for m in chores})
    starts = Counter(e.firing_id for e in events if e.type == "transition_started")
    assert set(starts.values()) == {2}  # every firing ran twice, and its effects still landed once
    completed = [e for e in events if e.type == "transition_completed"]
    assert len(completed) == 200
    assert all(c.outputs[0].data["key"] == c.firing_id for c in completed)  # context.idempotency_key
    state = fold(await EventLog(nc).read("effects", log.session_id))
    assert sorted(m.data["n"] for m in state.marking()["Done"]) == list(range(200))
    assert len(state.chat) == 200 and len(state.memory) == 200 and not state.in_flight


async def test_a_rerun_reads_the_answer_its_first_run_got_instead_of_asking_again(
    settings: Settings, nc: Any, executor_process: Callable[..., Any], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    first = await executor_process("--workers", "2", PETRIBUS_ACK_WAIT_S="2")
    async with Stack(settings, [EFFECTS], parts=("scheduler",)), SessionLog(nc, "effects") as log:
        await log.add("Risky", n=1, sleep=4.0, runs=str(runs))
        [asked] = await log.until("confirm_request")
        await EventLog(nc).append(ConfirmResponse(bot="effects", session_id=log.session_id,
                                                  request_id=asked.request_id, accepted=True, cause=asked.id))
        await log.until("agent_message")
        await first.kill()  # while it sleeps, after it asked, was answered and said so
        await executor_process("--workers", "2", PETRIBUS_ACK_WAIT_S="2")
        [done] = await log.until("transition_completed", timeout=30)

    events = await _raw(nc, log.session_id)
    assert [e.type for e in events].count("transition_started") == 2
    assert len(list(runs.iterdir())) == 2  # the transition really ran twice
    assert [e.type for e in events].count("confirm_request") == 1
    assert [e.text for e in events if isinstance(e, AgentMessage)] == ["answer for 1: True"]
    assert done.outputs[0].data == {"n": 1, "yes": True}


async def test_work_for_a_firing_that_already_ended_is_acked_without_running_at_any_age(
    settings: Settings, nc: Any
) -> None:
    js = nc.jetstream()
    async with Stack(settings, [EFFECTS], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "effects") as log:
        await log.add("Chore", n=7)
        [done] = await log.until("transition_completed")
        [fired] = log.of("transition_fired")
        # A second work item for the finished firing, with a Msg-Id of its own: what a scheduler that lost
        # its cache sends long after JetStream's duplicate window has forgotten the first.
        again = WorkItem(bot="effects", session_id=log.session_id, firing_id=fired.firing_id,
                         transition="chore", inputs=[Marker(location="Chore", data={"n": 7})],
                         fired_seq=1)
        reads = stack.services["executor"].runner.folds.reads
        await js.publish(again.subject("cpu"), again.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": f"work:{fired.firing_id}:again"})
        async with asyncio.timeout(20):
            while (await js.stream_info(subjects.WORK_STREAM)).state.messages:
                await asyncio.sleep(0.05)
        assert stack.services["executor"].runner.folds.reads > reads  # it looked at the log, then acked

    assert len(log.of("transition_started")) == 1 and len(log.of("transition_completed")) == 1
    assert done.firing_id == fired.firing_id


async def test_a_retry_waits_its_back_off_in_jetstream_so_a_killed_executor_neither_loses_nor_resets_it(
    settings: Settings, nc: Any, executor_process: Callable[..., Any], tmp_path: Path
) -> None:
    # ack_wait is long: had the wait lived in the killed process, the retry would come only after it.
    env = {"PETRIBUS_ACK_WAIT_S": "120", "PETRIBUS_RETRY_BACKOFF_S": "3"}
    first = await executor_process("--workers", "2", **env)
    naks = await nc.subscribe(f"$JS.ACK.{subjects.WORK_STREAM}.>")  # how an executor hands work back
    async with Stack(settings, [EFFECTS], parts=("scheduler",)), SessionLog(nc, "effects") as log:
        await log.add("Flaky", fail_times=2, counter=str(tmp_path / "count"))
        while not (await naks.next_msg(timeout=30)).data.startswith(b"-NAK"):
            pass
        # The first run failed and its work went back to JetStream with the back-off as its delay.
        await log.until("transition_failed")
        await first.kill()
        await executor_process("--workers", "2", **env)
        [done] = await log.until("transition_completed", timeout=40)

    fails = log.of("transition_failed")
    starts = log.of("transition_started")
    assert [(f.attempt, f.final) for f in fails] == [(1, False), (2, False)]
    assert [s.attempt for s in starts] == [1, 2, 3]
    assert done.outputs[0].data == {"n": 3, "key": ""}
    for fail, retry in zip(fails, starts[1:]):
        assert fail.retry_in_s is not None
        assert retry.ts >= fail.ts + fail.retry_in_s - 0.05  # the back-off was waited out, not skipped
    # Exponential with jitter: the first wait is in [1.5, 3] s, the second in [3, 6] s.
    assert 1.5 <= fails[0].retry_in_s <= 3 and 3 <= fails[1].retry_in_s <= 6


def test_back_off_doubles_is_capped_and_jittered() -> None:
    runner = FiringRunner.__new__(FiringRunner)
    runner.retry_backoff_s, runner.retry_backoff_max_s = 1.0, 10.0
    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (30, 10.0)]:
        waits = {runner.backoff(failures) for _ in range(50)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (failures, waits)
        assert len(waits) > 1  # jittered


def test_the_fold_takes_a_firings_side_effect_once_at_any_age() -> None:
    fired = TransitionFired(bot="effects", session_id="s", firing_id="f", transition="chore", consumed=["m"])
    say = Effect.of("f", "say", 0)
    said = AgentMessage(id=say.id, bot="effects", session_id="s", firing_id="f", text="hi")
    kept = MemoryUpdated(id=Effect.of("f", "remember", 0).id, bot="effects", session_id="s", firing_id="f",
                         memory={"k": 1})
    user_said = AgentMessage(id=uuid.uuid4().hex, bot="effects", session_id="s", text="hello")
    log = [MarkerAdded(bot="effects", session_id="s", marker=Marker(id="m", location="Chore", data={"n": 1})),
           fired, said, kept, user_said,
           # the same effects again, as a re-run appends them after the duplicate window
           said, kept, user_said.model_copy(update={"id": uuid.uuid4().hex})]
    state = fold(enumerate(log, start=1))
    assert [t.text for t in state.chat] == ["hi", "hello", "hello"]
    assert state.memory == [{"k": 1}]
    assert Effect.of("f", "say", 0) == say and Effect.of("f", "say", 1) != say


async def test_outputs_too_large_for_one_event_fail_the_firing_for_good_with_what_to_change(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [EFFECTS], parts=("scheduler", "executor")), SessionLog(nc, "effects") as log:
        big = await log.add("Big", n_bytes=2 * nc.max_payload)
        [failed] = await log.until("transition_failed", final=True)
        small = await log.add("Big", n_bytes=10)  # the executor is fine, and the next firing runs
        [done] = await log.until("transition_completed")

    assert failed.error_type == "TransitionOutputError" and not failed.retryable
    assert "max_payload" in failed.error and "send_file" in failed.error
    assert len(log.of("transition_started", firing_id=failed.firing_id)) == 1  # not retried over and over
    assert done.outputs[0].data == {"text": "x" * 10}
    marking = (await log.state()).marking()
    assert [m.id for m in marking["Big"]] == [big.id]  # it came back; the small one was consumed
    assert [m.data for m in marking["Huge"]] == [{"text": "x" * 10}] and small.id != big.id


async def test_inputs_too_large_for_one_work_item_fail_the_firing_for_good_and_the_session_goes_on(
    settings: Settings, nc: Any
) -> None:
    heavy = EFFECTS.replace(":bot", ":heavy")
    third = nc.max_payload // 3 + 1000  # three of these are over the bus's limit for one message
    async with Stack(settings, [heavy], parts=("scheduler", "executor")), SessionLog(nc, "heavy") as log:
        parts = [await log.add("Part", text="x" * third) for _ in range(3)]
        [failed] = await log.until("transition_failed", final=True)
        small = [await log.add("Part", text="y") for _ in range(3)]
        [done] = await log.until("transition_completed")

    assert failed.error_type == "InputsTooLarge" and not failed.retryable and "max_payload" in failed.error
    assert not log.of("transition_started", firing_id=failed.firing_id)  # never sent to an executor
    assert done.outputs[0].data == {"size": 3}
    marking = (await log.state()).marking()
    assert [m.id for m in marking["Part"]] == [p.id for p in parts]  # back, and not offered to glue again
    assert {m.id for m in small}.isdisjoint(m.id for m in marking["Part"])
    assert not log.of("error")  # the session was not parked
