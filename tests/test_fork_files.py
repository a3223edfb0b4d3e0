"""A fork's copied files over the real stack: either the whole fork exists, or neither its session nor
any copy of a file does. Failures are injected where the fork copies and where it appends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from petribus.bus import EventLog
from petribus.errors import BusError
from petribus.events import OutputFile, SessionForked
from petribus.files import FileStore

from .conftest import APPS
from .harness import Stack

HITL = f"{APPS / 'hitl_bot.py'}:bot"


@pytest.fixture
async def http(settings, nc) -> AsyncIterator[httpx.AsyncClient]:
    async with Stack(settings, [HITL], parts=("scheduler", "executor", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as client:
        yield client


async def _with_files(http: httpx.AsyncClient, log: EventLog, sizes: list[int]) -> tuple[str, list]:
    """A session that sent one file of each size; its events once all are in."""
    sid = (await http.post("/bots/hitl/sessions")).json()["session_id"]
    for size in sizes:
        await http.post(f"/bots/hitl/sessions/{sid}/markers", json={"location": "Blob", "data": {"size": size}})
    async with asyncio.timeout(60):
        while True:
            events = await log.read("hitl", sid)
            if sum(isinstance(ev, OutputFile) for _, ev in events) == len(sizes):
                return sid, events
            await log.wait_for("hitl", sid, after=events[-1][0], match=lambda ev: True, timeout=60)


async def _stored(store: FileStore, session_id: str, file_ids: list[str]) -> list[bool]:
    return [await store.info("hitl", session_id, f) is not None for f in file_ids]


async def test_a_fork_whose_append_fails_leaves_no_copied_file(http, nc, monkeypatch):
    log, store = EventLog(nc), FileStore(nc.jetstream(), max_bytes=1 << 20)
    sid, events = await _with_files(http, log, [100, 200])
    file_ids = [ev.file_id for _, ev in events if isinstance(ev, OutputFile)]
    real = EventLog.append_batch
    failed: list[tuple[str, list[bool]]] = []

    async def append_batch(self: EventLog, batch: list, **kwargs: Any) -> list[int]:
        if isinstance(batch[0], SessionForked) and not failed:
            # The copies are made by now (the events name them): the append fails after them.
            failed.append((batch[0].session_id, await _stored(store, batch[0].session_id, file_ids)))
            raise BusError("injected: the bus refused the fork's batch", code="bus_error", retryable=False)
        return await real(self, batch, **kwargs)

    monkeypatch.setattr(EventLog, "append_batch", append_batch)
    headers = {"Idempotency-Key": "fork-after-a-failure"}
    r = await http.post(f"/bots/hitl/sessions/{sid}/fork", json={"at": events[-1][0]}, headers=headers)
    assert r.status_code == 500, r.text
    [(fork, copied)] = failed
    assert copied == [True, True]
    assert await _stored(store, fork, file_ids) == [False, False]
    assert await log.read("hitl", fork) == []
    # The same request again makes the whole fork, files included.
    again = await http.post(f"/bots/hitl/sessions/{sid}/fork", json={"at": events[-1][0]}, headers=headers)
    assert again.status_code == 201 and again.json()["session_id"] == fork
    assert await _stored(store, fork, file_ids) == [True, True]


async def test_a_fork_whose_append_answer_is_lost_keeps_its_files(http, nc, monkeypatch):
    log, store = EventLog(nc), FileStore(nc.jetstream(), max_bytes=1 << 20)
    sid, events = await _with_files(http, log, [100])
    file_ids = [ev.file_id for _, ev in events if isinstance(ev, OutputFile)]
    real = EventLog.append_batch

    async def append_batch(self: EventLog, batch: list, **kwargs: Any) -> list[int]:
        seqs = await real(self, batch, **kwargs)
        if isinstance(batch[0], SessionForked):
            raise BusError("injected: the answer to the fork's batch was lost", code="bus_unavailable")
        return seqs

    monkeypatch.setattr(EventLog, "append_batch", append_batch)
    r = await http.post(f"/bots/hitl/sessions/{sid}/fork", json={"at": events[-1][0]})
    assert r.status_code == 201, r.text  # it landed: the log says so
    fork = r.json()["session_id"]
    [(seq, first)] = (await log.read("hitl", fork))[:1]
    assert isinstance(first, SessionForked) and r.json()["seq"] == seq
    assert await _stored(store, fork, file_ids) == [True]
    got = await http.get(f"/bots/hitl/sessions/{fork}/files/{file_ids[0]}")
    assert got.status_code == 200 and got.content == b"x" * 100


async def test_a_fork_whose_copying_fails_half_way_deletes_what_it_copied(http, nc, monkeypatch):
    log, store = EventLog(nc), FileStore(nc.jetstream(), max_bytes=1 << 20)
    sid, events = await _with_files(http, log, [100, 200, 300])
    file_ids = [ev.file_id for _, ev in events if isinstance(ev, OutputFile)]
    real = FileStore.put
    puts: list[str] = []

    async def put(self: FileStore, bot: str, session_id: str, file_id: str, *args: Any, **kwargs: Any) -> int:
        if session_id != sid:
            puts.append(session_id)
            if len(puts) == 2:
                raise BusError("injected: the object store refused the second copy", code="bus_error",
                               retryable=False)
        return await real(self, bot, session_id, file_id, *args, **kwargs)

    monkeypatch.setattr(FileStore, "put", put)
    r = await http.post(f"/bots/hitl/sessions/{sid}/fork", json={"at": events[-1][0]})
    assert r.status_code == 500, r.text
    fork = puts[0]
    assert await _stored(store, fork, file_ids) == [False, False, False]
    assert await log.read("hitl", fork) == []
    assert await _stored(store, sid, file_ids) == [True, True, True]  # the source's are untouched
