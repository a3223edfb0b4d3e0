"""File routes: download what a transition sent (``output_file``), upload what one asked for
(``input_file_request``).

``GET /bots/{bot}/sessions/{session_id}/files/{file_id}`` streams a file of the session from the
``PB_FILES`` object store. ``PUT`` (the raw bytes; name in ``?name=``) or ``POST`` (multipart, one file
part) to the same path answers the pending file request ``file_id``: the bytes are stored under an id
of their own, then ``input_file_response`` is appended through ``answers.answer_once``, so of two
racing uploads one counts and the other gets 409 (and its bytes are removed); a retry with the
``Idempotency-Key`` of an upload that counted gets that upload's answer back (``replayed``), and its
bytes are not read. Before a byte is read,
the request must be pending and a declared ``Content-Length`` within ``PETRIBUS_MAX_FILE_BYTES``;
while reading, the count is checked again (413).

Who may read or upload: whoever may see the session (``auth.guard``, a dependency of every route here):
another owner's session, or a bot the key may not use, is answered as one that does not exist (404; a
download: as the file of a deleted session, ``unknown_file``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from petribus import subjects
from petribus.answers import to_file_request
from petribus.core import fold
from petribus.errors import AlreadyAnswered, InvalidInput, UnknownRequest, UnknownSession
from petribus.events import Event, InputFileResponse, new_id
from petribus.files import FILE_ID_RE, content_type, header, safe_name, too_large
from petribus.net import Net
from petribus_gateway import idempotency, inputs
from petribus_gateway.auth import Caller, CallerDep, guard
from petribus_gateway.context import GatewayContext, bus_ready, check_session_id, context
from petribus_gateway.models import ErrorBody, Uploaded

Ctx = Annotated[GatewayContext, Depends(context)]
FILE_PATH = "/bots/{bot}/sessions/{session_id}/files/{file_id}"
CHUNK = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024  # a larger file is spooled to a temporary file, not held in memory
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body

router = APIRouter(tags=["files"])


def bot_net(bot: str, ctx: Ctx) -> Net:
    return ctx.net(bot)


BotNet = Annotated[Net, Depends(bot_net)]

DOWNLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such bot, session or file."},
    422: {"model": ErrorBody, "description": "An id that is not an id."},
    503: {"model": ErrorBody, "description": "The file store is unavailable for now: retry after Retry-After "
          "seconds."},
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such bot or session, or no such file request in it."},
    409: {"model": ErrorBody, "description": "The request no longer waits: uploaded, timed out or ended."},
    413: {"model": ErrorBody, "description": "The file is larger than PETRIBUS_MAX_FILE_BYTES."},
    422: {"model": ErrorBody, "description": "Not a file upload (no file part, bad ids)."},
    400: {"model": ErrorBody, "description": "An Idempotency-Key that is not 1-128 printable ASCII characters."},
    503: {"model": ErrorBody, "description": "The session log or file store is unavailable for now: retry after "
          "Retry-After seconds with the same Idempotency-Key."},
}
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="Names this upload (1-128 printable ASCII characters). A retry with the same key gets the "
                "first upload's answer (replayed: true) instead of 409.")]


def _no_file(bot: str, session_id: str, file_id: str) -> UnknownRequest:
    return UnknownRequest(f"no file {file_id!r} in session {session_id!r} of bot {bot!r}; use the url of an "
                          "output_file or input_file_response event", code="unknown_file")


async def download_guard(request: Request) -> Caller:
    """``guard``, answering a session the caller may not see as a download answers a deleted session's file."""
    try:
        return await guard(request)
    except UnknownSession:
        p = request.path_params
        raise _no_file(p["bot"], p["session_id"], p["file_id"]) from None


@router.get(FILE_PATH, responses={200: {"content": {"application/octet-stream": {}}}, **DOWNLOAD_ERRORS},
            dependencies=[Depends(download_guard), Depends(bus_ready)])
async def download(net: BotNet, session_id: str, file_id: str, ctx: Ctx) -> StreamingResponse:
    """The bytes of one of the session's files (its ``output_file`` or ``input_file_response`` URL)."""
    _check_ids(session_id, file_id)
    info = await ctx.files.info(net.bot, session_id, file_id)
    if info is None:
        raise _no_file(net.bot, session_id, file_id)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    try:
        await ctx.files.get_into(net.bot, session_id, file_id, spool)  # type: ignore[arg-type]
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    name = safe_name(header(info, "Filename") or info.description, fallback=file_id)
    return StreamingResponse(
        _chunks(spool), media_type=header(info, "Content-Type") or content_type(name),
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(info.size)},
        background=BackgroundTask(spool.close),
    )


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    while chunk := spool.read(CHUNK):
        yield chunk


@router.put(FILE_PATH, status_code=201, response_model=Uploaded, responses=UPLOAD_ERRORS,
            dependencies=[Depends(guard)],
            openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
async def upload_bytes(
    net: BotNet, session_id: str, file_id: str, request: Request, ctx: Ctx, response: Response, caller: CallerDep,
    name: Annotated[str | None, Query(max_length=255, description="The file's name.")] = None,
    idempotency_key: IdempotencyKey = None,
) -> Uploaded:
    """Answer a pending ``input_file_request``: the request body is the file."""
    _check_ids(session_id, file_id)
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    replay = await _pending(ctx, net, session_id, file_id, key)
    if replay is not None:
        return _replayed(replay, response)
    limit = ctx.files.max_bytes
    _check_declared(request, limit, 0)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    try:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit, "the upload (so far)")
            spool.write(chunk)
        spool.seek(0)
        kind = request.headers.get("content-type")
        return await _store(ctx, net, session_id, file_id, spool, name or file_id,  # type: ignore[arg-type]
                            None if kind in (None, "application/x-www-form-urlencoded") else kind, key, response,
                            caller)
    finally:
        spool.close()


@router.post(FILE_PATH, status_code=201, response_model=Uploaded, responses=UPLOAD_ERRORS,
             dependencies=[Depends(guard)],
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}},
                 "required": True}})
async def upload_form(net: BotNet, session_id: str, file_id: str, request: Request, ctx: Ctx, response: Response,
                      caller: CallerDep, idempotency_key: IdempotencyKey = None) -> Uploaded:
    """Answer a pending ``input_file_request`` with a multipart form holding one file part."""
    _check_ids(session_id, file_id)
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    replay = await _pending(ctx, net, session_id, file_id, key)
    if replay is not None:
        return _replayed(replay, response)
    limit = ctx.files.max_bytes
    _check_declared(request, limit, MULTIPART_OVERHEAD)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("POST a multipart/form-data body with one file part, or PUT the raw bytes",
                           code="not_multipart")
    limited = Request(request.scope, receive=_limited(request.receive, limit + MULTIPART_OVERHEAD))
    try:
        form = await limited.form(max_files=1, max_fields=8)
    except (ValueError, KeyError, AssertionError) as exc:
        raise InvalidInput(f"the multipart body could not be read: {exc}", code="not_multipart") from None
    try:
        uploads = [v for v in form.values() if isinstance(v, UploadFile)]
        if not uploads:
            raise InvalidInput("the form has no file part; send the file as a part named 'file'",
                               code="no_file")
        upload = uploads[0]
        if upload.size is not None and upload.size > limit:
            raise too_large(upload.size, limit, f"file {upload.filename!r}")
        return await _store(ctx, net, session_id, file_id, upload.file,  # type: ignore[arg-type]
                            upload.filename or file_id, upload.content_type, key, response, caller)
    finally:
        await form.close()


def _check_ids(session_id: str, file_id: str) -> None:
    check_session_id(session_id)
    if not FILE_ID_RE.match(file_id):
        raise InvalidInput(f"file id {file_id[:140]!r} is not valid: use the id from the event's url",
                           code="invalid_file_id")


def _check_declared(request: Request, limit: int, overhead: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + overhead:
        raise too_large(int(declared) - overhead, limit, "the upload")


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body longer than ``limit`` while it is read (no Content-Length needed)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(seen, limit, "the upload (so far)")
        return message

    return wrapped


async def _pending(ctx: GatewayContext, net: Net, session_id: str, file_id: str,
                   key: str | None) -> tuple[int, InputFileResponse] | None:
    """Refuse (404, 409) before reading a byte when there is no pending request to answer; the upload
    that ``key`` names instead, when it already answered it (a retry)."""
    await ctx.require_session(net.bot, session_id)
    probe = InputFileResponse(bot=net.bot, session_id=session_id, file_id=file_id)
    log = await ctx.events.read(net.bot, session_id)
    if key is not None:
        mine = idempotency.keyed(probe, key).id
        for seq, event in log:
            if event.id == mine and isinstance(event, InputFileResponse):
                return seq, event
    to_file_request(probe)(fold(log))
    return None


def _replayed(found: tuple[int, Event], response: Response) -> Uploaded:
    seq, event = found
    assert isinstance(event, InputFileResponse)
    response.headers["Idempotent-Replayed"] = "true"
    return Uploaded(file_id=event.file_id, stored_id=event.stored_id or "", name=event.name or "",
                    size=event.size or 0, url=event.url or "", seq=seq, replayed=True)


async def _store(ctx: GatewayContext, net: Net, session_id: str, file_id: str, data: BinaryIO,
                 given_name: str, given_type: str | None, key: str | None, response: Response,
                 caller: Caller) -> Uploaded:
    name = safe_name(given_name, fallback=file_id)
    kind = content_type(name, given_type)
    stored_id = new_id()
    size = await ctx.files.put(net.bot, session_id, stored_id, data, name=name, content_type=kind)
    url = subjects.file_url(net.bot, session_id, stored_id)
    answer = InputFileResponse(bot=net.bot, session_id=session_id, file_id=file_id, name=name, size=size,
                               content_type=kind, stored_id=stored_id, url=url, actor=caller.actor())
    if key is not None:
        answer = idempotency.keyed(answer, key)
    try:
        seq, _ = await inputs.append_answer(ctx.events, answer)
    except BaseException as exc:
        await ctx.files.delete(net.bot, session_id, stored_id)  # it does not count: don't keep it
        # A retry racing its own first try (same key) gets the first try's answer.
        found = await idempotency.find(ctx.events, answer) if key and isinstance(exc, AlreadyAnswered) else None
        if found is None:
            raise
        return _replayed(found, response)
    ctx.log.info("file uploaded", bot=net.bot, session_id=session_id, file_id=file_id, size=size, seq=seq)
    return Uploaded(file_id=file_id, stored_id=stored_id, name=name, size=size, url=url, seq=seq)
