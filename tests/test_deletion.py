"""A deleted session stays deleted, and an idle one expires (petribus.deletion, docs/limits.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from petribus import subjects
from petribus.bus import EventLog
from petribus.events import UserMessage, decode
from petribus.settings import Settings

from .conftest import app
from .harness import Client, Stack

SLOW = app("limits_slow")


async def _until(check: Any, timeout: float = 30.0) -> None:
    """Wait for ``check()`` to hold (observed state of another process: a file, a counter)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def _count(nc: Any, session_id: str) -> int:
    return await EventLog(nc).count("limits_slow", session_id)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with Stack(settings, [SLOW], parts=("scheduler", "executor", "gateway")) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as client:
        yield client


async def test_a_session_deleted_while_its_firing_runs_stays_deleted(
    stack: Stack, http: httpx.AsyncClient, nc: Any, tmp_path: Path
) -> None:
    sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
    added = await http.post(f"/bots/limits_slow/sessions/{sid}/markers",
                            json={"location": "Go", "data": {"folder": str(tmp_path)}})
    assert added.status_code == 201, added.text
    await _until(lambda: (tmp_path / "started").exists())
    runner = stack.services["executor"].runner
    assert len(runner._running) == 1  # the firing is running as the session is deleted

    assert (await http.delete(f"/bots/limits_slow/sessions/{sid}")).status_code == 204
    assert await _count(nc, sid) == 0
    (tmp_path / "release").write_text("1")

    await _until(lambda: runner.cancelled == 1)  # its say and its outcome were refused, its work acked
    assert (tmp_path / "sending").exists()  # the transition ran on after the deletion, as far as its file
    assert not runner._running
    assert await _count(nc, sid) == 0
    assert (await http.get(f"/bots/limits_slow/sessions/{sid}")).status_code == 404
    work = await nc.jetstream().stream_info(subjects.WORK_STREAM,
                                            subjects_filter=subjects.session_work("limits_slow", sid))
    assert not work.state.subjects
    # The file it sent after the deletion was stored, then removed when its output_file was refused.
    assert await _stored_files(nc, sid) == []


async def _stored_files(nc: Any, sid: str) -> list[str]:
    store = await nc.jetstream().object_store(subjects.FILES_BUCKET)
    try:
        listed = await store.list()
    except NotFoundError:  # an empty store
        return []
    return [o.name for o in listed if o.name.startswith(f"limits_slow/{sid}/") and not o.deleted]


async def test_an_append_that_slips_past_a_deletion_is_purged_again(
    stack: Stack, http: httpx.AsyncClient, nc: Any
) -> None:
    sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
    assert (await http.delete(f"/bots/limits_slow/sessions/{sid}")).status_code == 204
    # A writer that does not check tombstones (an LLM reply on its way) appends after the purge.
    late = await EventLog(nc).append(UserMessage(bot="limits_slow", session_id=sid, text="late"))
    assert late > 0

    async def gone() -> None:
        while await _count(nc, sid):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(gone(), 30)  # the scheduler saw the late event and purged the subject again
    assert (await http.get(f"/bots/limits_slow/sessions/{sid}")).status_code == 404


async def test_an_idle_session_expires_with_session_expired_then_answers_404(settings: Settings, nc: Any) -> None:
    short = settings.model_copy(update={"session_ttl_s": 1.0})
    async with Stack(short, [SLOW], parts=("scheduler", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
        seen: asyncio.Queue[str] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            seen.put_nowait(decode(msg.data).type)

        sub = await nc.jetstream().subscribe(
            subjects.events("limits_slow", sid), stream=subjects.EVENTS_STREAM, ordered_consumer=True,
            cb=on_msg, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            assert await asyncio.wait_for(seen.get(), 10) == "session_created"
            assert await asyncio.wait_for(seen.get(), 30) == "session_expired"
        finally:
            await sub.unsubscribe()

        async def gone() -> None:
            while await _count(nc, sid):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(gone(), 30)
        assert (await http.get(f"/bots/limits_slow/sessions/{sid}")).status_code == 404
        assert stack.services["scheduler"].idle.expired == 1


async def test_a_session_with_events_does_not_expire_before_it_is_idle(settings: Settings, nc: Any) -> None:
    short = settings.model_copy(update={"session_ttl_s": 3.0})
    async with Stack(short, [SLOW], parts=("scheduler", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
        log = EventLog(nc)
        # Keep it busy past its first idle check: each message moves the deadline.
        for i in range(5):
            await asyncio.sleep(1.0)
            await log.append(UserMessage(bot="limits_slow", session_id=sid, text=f"still here {i}"))
        assert (await http.get(f"/bots/limits_slow/sessions/{sid}")).status_code == 200
        assert stack.services["scheduler"].idle.expired == 0


async def test_sessions_older_than_expiry_get_an_idle_check_when_it_is_first_turned_on(
    settings: Settings, nc: Any
) -> None:
    log = EventLog(nc)
    # A session from before expiry existed: nothing ever armed a timer for it.
    await log.append(UserMessage(bot="limits_slow", session_id="ancient", text="hello"))
    short = settings.model_copy(update={"session_ttl_s": 1.0})
    async with Stack(short, [SLOW], parts=("scheduler",)) as stack:
        async def gone() -> None:
            while await _count(nc, "ancient"):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(gone(), 30)
        assert stack.services["scheduler"].idle.expired == 1


async def test_a_message_that_lands_after_a_deletion_gets_no_answer(settings: Settings, nc: Any) -> None:
    """The LLM service appends nothing for a deleted session (and asks no model): a user message that
    slipped past the deletion is acked unanswered, so the session does not reappear with a reply."""
    async with Stack(settings, [SLOW], parts=("llm", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        llm = stack.services["llm"]
        sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
        assert (await http.delete(f"/bots/limits_slow/sessions/{sid}")).status_code == 204
        await _until(lambda: llm.tombstones.deleted("limits_slow", sid))
        late = await EventLog(nc).append(UserMessage(bot="limits_slow", session_id=sid, text="late"))
        await _until(lambda: llm.stats["deleted"] == 1)
        assert llm.stats["answered"] == 0
        assert [seq for seq, _ in await EventLog(nc).read("limits_slow", sid)] == [late]  # no reply after it


async def test_a_message_on_a_socket_opened_before_the_deletion_is_refused(settings: Settings, nc: Any) -> None:
    """The gateway appends nothing for a deleted session: a client still connected to it gets an error
    (as for a session that does not exist) and the purged log stays empty."""
    async with Stack(settings, [SLOW], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        sid = (await http.post("/bots/limits_slow/sessions")).json()["session_id"]
        client = await Client.connect(stack.ws_url("limits_slow", session_id=sid))
        try:
            await client.until("session_created")
            assert (await http.delete(f"/bots/limits_slow/sessions/{sid}")).status_code == 204
            tombstones = stack.gateway.app.state.gateway.events.tombstones
            await _until(lambda: tombstones.deleted("limits_slow", sid))
            await client.send({"type": "user_message", "value": "still there?"})
            error = await client.until("error")
        finally:
            await client.close()
        assert error["value"]["code"] == "session_deleted", error
        assert await _count(nc, sid) == 0  # nothing landed after the purge
        posted = await http.post(f"/bots/limits_slow/sessions/{sid}/messages", json={"text": "and now?"})
        assert posted.status_code == 404 and await _count(nc, sid) == 0
