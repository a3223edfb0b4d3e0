"""The dashboard's session statuses (``petribus_gateway.ui.status_of``, served by ``GET /bots/{bot}/recent``):
idle, running, waiting for a person, failed. First over folded logs, then over the real stack, where a
firing claimed with no executor to run it stays in flight for as long as the test looks."""

from __future__ import annotations

from typing import Any

import httpx
from petribus.events import (
    ConfirmRequest,
    ConfirmResponse,
    InputFileRequest,
    SessionCreated,
    TransitionStarted,
    UserMessage,
)
from petribus.settings import Settings
from petribus_gateway.ui import status_of

from .harness import Client, Stack
from .test_core import B, Log, S
from .test_metrics import APP, BOT


def _log() -> Log:
    log = Log()
    log.append(SessionCreated(bot=B, session_id=S))
    return log


def status(log: Log) -> str:
    return status_of(log.state, log.entries[-1][1])


def test_a_new_session_and_one_whose_firings_completed_are_idle() -> None:
    log = _log()
    assert status(log) == "idle"
    fid = log.fire("t", log.add("In"))
    log.complete(fid, "t")
    assert status(log) == "idle"


def test_a_claimed_or_started_firing_is_running_and_so_is_one_that_failed_but_retries() -> None:
    log = _log()
    fid = log.fire("t", log.add("In"))
    assert status(log) == "running"  # claimed, no executor has it yet
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=fid, transition="t", executor="x1"))
    assert status(log) == "running"
    log.fail(fid, "t", final=False)
    assert status(log) == "running"  # its newest event is a failure, but a retry follows


def test_a_confirmation_a_question_or_a_file_asked_of_a_person_is_waiting() -> None:
    confirm = _log()
    confirm.fire("t", confirm.add("In"), confirm=True)
    assert status(confirm) == "waiting"

    asked = _log()
    fid = asked.fire("t", asked.add("In"))
    asked.append(ConfirmRequest(bot=B, session_id=S, firing_id=fid, transition="t", description="go?",
                                request_id="r1"))
    assert status(asked) == "waiting"  # in flight too: the person is what it waits for
    asked.append(ConfirmResponse(bot=B, session_id=S, firing_id=fid, transition="t", accepted=True,
                                 request_id="r1"))
    assert status(asked) == "running"

    upload = _log()
    fid = upload.fire("t", upload.add("In"))
    upload.append(InputFileRequest(bot=B, session_id=S, firing_id=fid, transition="t", file_id="file1",
                                   description="your invoice"))
    assert status(upload) == "waiting"


def test_failed_only_while_the_newest_event_is_a_firing_that_failed_for_good() -> None:
    log = _log()
    fid = log.fire("t", log.add("In"))
    log.fail(fid, "t", final=True)
    assert status(log) == "failed"
    log.append(UserMessage(bot=B, session_id=S, text="and now?"))
    assert status(log) == "idle"  # the session moved on


def test_waiting_outranks_a_failure_of_another_firing() -> None:
    log = _log()
    log.fire("gate", log.add("Gate"), confirm=True)
    fid = log.fire("t", log.add("In"))
    log.fail(fid, "t", final=True)
    assert status(log) == "waiting"


async def _status(http: httpx.AsyncClient, session_id: str) -> str:
    answer = await http.get(f"/bots/{BOT}/recent")
    assert answer.status_code == 200, answer.text
    [row] = [s for s in answer.json()["sessions"] if s["session_id"] == session_id]
    return row["status"]


async def _added(client: Client, location: str, until: Any) -> dict[str, Any]:
    await client.send({"type": "marker_added", "value": {"location": location, "data": {"n": 1}}})
    return await client.until(until)


async def test_recent_shows_each_status_as_the_session_goes_through_it(settings: Settings) -> None:
    async with Stack(settings, [APP], parts=("scheduler", "gateway")) as stack:
        client = await Client.connect(stack.ws_url(BOT))
        session_id = (await client.until("session_created"))["value"]
        async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
            assert await _status(http, session_id) == "idle"

            # Claimed, and no executor yet: the firing is in flight until one runs it.
            await _added(client, "Item", "transition_fired")
            assert await _status(http, session_id) == "running"

            async with Stack(settings, [APP], parts=("executor",)):
                await client.until("transition_completed")
                assert await _status(http, session_id) == "idle"

                failed = await _added(client, "Bad", "transition_failed")
                assert failed["value"]["final"] is True
                assert await _status(http, session_id) == "failed"

                await _added(client, "Gate", "confirm_transition")
                assert await _status(http, session_id) == "waiting"
        await client.close()
