"""Files end to end against a real nats-server: a user's upload reaches a running transition as a local
path (``context.get_file``), a transition's file reaches every client as a download URL
(``context.send_file``), and uploads that cannot count are refused with a 4xx that says why."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from petribus.events import InputFileResponse, OutputFile
from petribus.settings import Settings

from .conftest import app
from .harness import Client, Stack, session_state

HITL = app("hitl_bot")
PARTS = ("scheduler", "executor", "gateway")
LIMIT = 64 * 1024


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with Stack(settings.model_copy(update={"max_file_bytes": LIMIT}), [HITL], parts=PARTS) as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as client:
        yield client


async def _session(stack: Stack) -> tuple[Client, str]:
    client = await Client.connect(stack.ws_url("hitl"))
    created = await client.recv()
    return client, created["value"]


def _marker(location: str, **data: Any) -> dict[str, Any]:
    return {"type": "marker_added", "value": {"location": location, "data": data}}


def _ended(transition: str):
    return lambda e: (e["type"] in ("transition_completed", "transition_failed")
                      and e["metadata"]["transition_name"] == transition)


async def _requested(client: Client, **upload: Any) -> dict[str, Any]:
    await client.send(_marker("Upload", **upload))
    return await client.until("input_file_request")


async def test_a_file_round_trips_through_a_transition_byte_for_byte(stack: Stack, http: httpx.AsyncClient,
                                                                       nc) -> None:
    sent = os.urandom(LIMIT - 1)  # several object-store chunks
    client, sid = await _session(stack)
    other = await Client.connect(stack.ws_url("hitl", session_id=sid))
    try:
        asked = await _requested(client, description="your receipt")
        request = asked["value"]
        assert request["description"] == "your receipt" and request["max_bytes"] == LIMIT
        assert asked["metadata"]["request_id"] == request["file_id"]
        assert asked["metadata"]["transition_name"] == "echo_file"
        assert request["upload_url"] == f"/bots/hitl/sessions/{sid}/files/{request['file_id']}"

        up = await http.put(request["upload_url"], params={"name": "../receipt 1.pdf"}, content=sent,
                            headers={"content-type": "application/pdf"})
        assert up.status_code == 201, up.text
        assert up.json()["name"] == "receipt 1.pdf" and up.json()["size"] == len(sent)
        again = await http.put(request["upload_url"], content=b"second")

        received = await client.until("input_file_response")
        output = await client.until("output_file")
        done = await client.until(_ended("echo_file"))
        assert await other.until("output_file") == output  # every client of the session sees it

        downloaded = await http.get(output["value"]["url"])
        kept = await http.get(received["value"]["url"])
    finally:
        await client.close()
        await other.close()

    assert again.status_code == 409 and again.json()["code"] == "already_answered"
    assert received["value"]["file_id"] == request["file_id"] and received["value"]["size"] == len(sent)
    assert output["value"]["name"] == "receipt 1.pdf" and output["value"]["size"] == len(sent)
    assert output["value"]["description"] == "your receipt 1.pdf, back"
    assert done["type"] == "transition_completed"
    assert done["value"]["outputs"][0]["data"] == {
        "name": "receipt 1.pdf", "size": len(sent), "sha256": hashlib.sha256(sent).hexdigest()}
    assert downloaded.status_code == 200 and downloaded.content == sent
    assert downloaded.headers["content-type"] == "application/pdf"
    assert 'filename="receipt 1.pdf"' in downloaded.headers["content-disposition"]
    assert kept.status_code == 200 and kept.content == sent

    state, _ = await session_state(nc, "hitl", sid)
    assert not state.pending_files and len(state.files) == 2
    detail = (await http.get(f"/bots/hitl/sessions/{sid}")).json()
    assert {f["direction"] for f in detail["files"]} == {"input", "output"}
    assert (await http.delete(f"/bots/hitl/sessions/{sid}")).status_code == 204
    gone = await http.get(output["value"]["url"])
    assert gone.status_code == 404 and gone.json()["code"] == "unknown_file"  # its bytes went with it


async def test_a_multipart_upload_counts_once_when_two_race_for_one_request(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    client, sid = await _session(stack)
    try:
        url = (await _requested(client, description="a photo"))["value"]["upload_url"]
        first, second = os.urandom(5000), os.urandom(7000)
        answers = await asyncio.gather(
            http.post(url, files={"file": ("one.png", first, "image/png")}),
            http.post(url, files={"file": ("two.png", second, "image/png")}),
        )
        done = await client.until(_ended("echo_file"))
    finally:
        await client.close()

    assert sorted(a.status_code for a in answers) == [201, 409]
    won = next(a for a in answers if a.status_code == 201).json()
    winner = first if won["name"] == "one.png" else second
    assert done["value"]["outputs"][0]["data"]["sha256"] == hashlib.sha256(winner).hexdigest()
    state, log = await session_state(nc, "hitl", sid)
    assert len([e for _, e in log if isinstance(e, InputFileResponse)]) == 1
    assert list(state.files)[0] == won["stored_id"]
    # The loser's bytes were not kept.
    assert all(e.stored_id == won["stored_id"] for _, e in log if isinstance(e, InputFileResponse))


async def test_uploads_that_cannot_count_get_a_4xx_and_leave_no_trace(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    client, sid = await _session(stack)
    try:
        request = (await _requested(client, description="a small file"))["value"]
        url = request["upload_url"]
        log_before = [seq for seq, _ in (await session_state(nc, "hitl", sid))[1]]
        base = f"/bots/hitl/sessions/{sid}/files"

        big = await http.put(url, content=b"x" * (LIMIT + 1))
        big_form = await http.post(url, files={"file": ("big.bin", b"x" * (LIMIT + 1))})
        streamed = await http.put(url, content=_chunks(b"y" * 4096, LIMIT // 4096 + 1))  # no Content-Length
        unknown = await http.put(f"{base}/nosuchfile", content=b"hi")
        bad_id = await http.put(f"{base}/a.b", content=b"hi")
        no_session = await http.put(f"/bots/hitl/sessions/nosession/files/{request['file_id']}",
                                    content=b"hi")
        not_form = await http.post(url, content=b"hi", headers={"content-type": "text/plain"})
        no_file = await http.post(url, data={"note": "no file here"}, files={"x": ("", b"")})
        no_download = await http.get(f"{base}/nosuchfile")
        log_after = [seq for seq, _ in (await session_state(nc, "hitl", sid))[1]]

        ok = await http.put(url, content=b"fits", params={"name": "small.txt"})
        done = await client.until(_ended("echo_file"))
    finally:
        await client.close()

    for too_large in (big, big_form, streamed):
        assert too_large.status_code == 413, too_large.text
        assert too_large.json()["code"] == "file_too_large"
        assert f"limit of {LIMIT} bytes" in too_large.json()["message"]
        assert "PETRIBUS_MAX_FILE_BYTES" in too_large.json()["message"]
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_file"
    assert bad_id.status_code == 422 and bad_id.json()["code"] == "invalid_file_id"
    assert no_session.status_code == 404 and no_session.json()["code"] == "unknown_session"
    assert not_form.status_code == 422 and not_form.json()["code"] == "not_multipart"
    assert no_file.status_code == 422 and no_file.json()["code"] == "no_file", no_file.text
    assert no_download.status_code == 404 and no_download.json()["code"] == "unknown_file"
    assert log_after == log_before  # nothing a refused upload did entered the log
    assert ok.status_code == 201
    assert done["value"]["outputs"][0]["data"]["size"] == 4


async def _chunks(chunk: bytes, n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield chunk


async def test_a_file_too_large_to_send_fails_the_transition_clearly(stack: Stack, http: httpx.AsyncClient,
                                                                      nc) -> None:
    client, sid = await _session(stack)
    try:
        await client.send(_marker("Blob", size=LIMIT + 1))
        failed = await client.until(_ended("send_blob"))
        await client.send(_marker("Blob", size=LIMIT))
        output = await client.until("output_file")
        downloaded = await http.get(output["value"]["url"])
    finally:
        await client.close()

    assert failed["type"] == "transition_failed" and failed["value"]["final"]
    expected = f"is {LIMIT + 1} bytes, larger than this deployment's limit of {LIMIT} bytes"
    assert expected in failed["value"]["error"]
    assert downloaded.content == b"x" * LIMIT
    _, log = await session_state(nc, "hitl", sid)
    assert [e.size for _, e in log if isinstance(e, OutputFile)] == [LIMIT]


async def test_a_file_request_nobody_answers_lapses_and_refuses_a_late_upload(
    stack: Stack, http: httpx.AsyncClient, nc
) -> None:
    client, sid = await _session(stack)
    try:
        request = (await _requested(client, description="too late", timeout=0.5))["value"]
        lapsed = await client.until("input_file_response")
        failed = await client.until(_ended("echo_file"))
        late = await http.put(request["upload_url"], content=b"here it is")
    finally:
        await client.close()

    assert lapsed["value"]["reason"] == "timeout" and lapsed["value"]["file_id"] == request["file_id"]
    assert failed["type"] == "transition_failed"
    assert "no file was uploaded within 0.5s" in failed["value"]["error"]
    assert late.status_code == 409 and late.json()["code"] == "already_answered"
    state, _ = await session_state(nc, "hitl", sid)
    assert not state.pending_files and not state.files
    assert [m.data["description"] for m in state.marking()["Upload"]] == ["too late"]  # given back
