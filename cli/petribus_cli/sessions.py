"""``petribus sessions``: move a session between deployments (``docs/replay.md``).

``export ID`` writes the session's log and the bytes of its files as one JSON-lines file
(``petribus.export``) to stdout or ``--output``. ``import FILE`` verifies the whole file first (a changed or
truncated file is refused, naming the line), then stores the files and appends the events to a new
session, in atomic batches: the first at expected last sequence 0, so an existing session is never
written into, each next one right after the previous. It prints the new session's id.

What import changes: the session id (a new one, or ``--session-id``), the bot with ``--bot``, the file
URLs that name the old session, and the sequences (the target stream assigns them). Everything else,
event ids and times included, is kept. An imported session is live: the bot's schedulers act on it as on
any other session (firings that were in flight when it was exported are dispatched again).

Exit codes, as the other commands: 0 done, 1 something failed (an unknown session, a session id that is
taken), 2 a bad file or option, 3 NATS cannot be reached.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from nats.js.errors import NotFoundError
from petribus import bus, subjects
from petribus.bot import NAME_RE
from petribus.bus import MAX_BATCH, EventLog, WrongLastSequence
from petribus.core import fold
from petribus.errors import BusError, InvalidInput, PetribusError, UnknownSession
from petribus.events import new_id
from petribus.export import BadExport, ExportedFile, SessionExport, dump, load
from petribus.files import FILE_ID_RE, FileStore, header, too_large
from petribus.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_NATS = 3
CONNECT_TIMEOUT_S = 5.0
ENVELOPE_BYTES = 4096  # room for the subject, headers and protocol line within max_payload

T = TypeVar("T")

sessions_app = typer.Typer(
    name="sessions", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Export and import sessions as JSON lines files.",
)

NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
    help="NATS server URL (comma-separated for a cluster).")]


@sessions_app.command("export")
def export_command(
    session_id: Annotated[str, typer.Argument(metavar="ID", help="The session to export.")],
    bot: Annotated[str | None, typer.Option(
        "--bot", help="The session's bot (default: found from the session id).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write here instead of to stdout.")] = None,
    nats_url: NatsUrl = None,
) -> None:
    """Write a session (its log and its files' bytes) as JSON lines, for `petribus sessions import` or
    `petribus replay`."""
    export = _run(nats_url, lambda nc: read_session(nc, session_id, bot=bot))
    if output is None:
        sys.stdout.buffer.writelines(dump(export))
        sys.stdout.buffer.flush()
        return
    try:
        with open(output, "wb") as target:
            target.writelines(dump(export))
    except OSError as exc:
        _fail(f"cannot write {output} ({exc})", EXIT_BAD_INPUT)
    typer.echo(f"exported session {export.session_id} of bot {export.bot}: {len(export.events)} events, "
               f"{len(export.files)} files, to {output}", err=True)


@sessions_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A file made by `petribus sessions export`.")],
    session_id: Annotated[str | None, typer.Option(
        "--session-id", help="The new session's id (default: a new random one); refused if it exists.")] = None,
    bot: Annotated[str | None, typer.Option(
        "--bot", help="Import it as a session of this bot (default: the exported session's). Check first "
        "that the bot's net fits the log: petribus replay APP FILE.")] = None,
    nats_url: NatsUrl = None,
) -> None:
    """Verify an exported session and add it as a new session; prints the new session's id."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file} ({exc})", EXIT_BAD_INPUT)
    try:
        export = load(data)
    except BadExport as exc:
        _fail(f"{file}: {exc.message}. Nothing was imported.", EXIT_BAD_INPUT)
    new = session_id or new_id()
    if not FILE_ID_RE.match(new):  # session ids are subject tokens, like file ids
        _fail(f"session id {new[:140]!r} is not valid: use 1-128 letters, digits, '_' or '-'", EXIT_BAD_INPUT)
    if bot is not None and not NAME_RE.match(bot):
        _fail(f"bot name {bot[:140]!r} is not valid: a letter or '_', then letters, digits, '_' or '-'",
              EXIT_BAD_INPUT)
    _run(nats_url, lambda nc: write_session(nc, export, session_id=new, bot=bot))
    typer.echo(new)


async def read_session(nc: Any, session_id: str, *, bot: str | None = None) -> SessionExport:
    """The session's log and the bytes of every file it holds, as an export."""
    js = nc.jetstream()
    log = EventLog(nc, js)
    bot = bot or await _bot_of(js, session_id)
    events = await log.read(bot, session_id)
    if not events:
        raise UnknownSession(f"session {session_id!r} of bot {bot!r} has no events: it never existed or was "
                             "deleted")
    store = FileStore(js, max_bytes=2**63)  # the limit is for storing; this only reads
    files: list[ExportedFile] = []
    for file_id, f in fold(events).files.items():
        info = await store.info(bot, session_id, file_id)
        if info is None:
            # As a fork does: a file whose bytes were deleted is listed by the log, but not carried.
            typer.echo(f"note: file {file_id} ({f.name}) is gone from {subjects.FILES_BUCKET}; exported without "
                       "its bytes", err=True)
            continue
        buffer = io.BytesIO()
        await store.get_into(bot, session_id, file_id, buffer)
        files.append(ExportedFile(file_id, f.name, f.content_type or header(info, "Content-Type")
                                  or "application/octet-stream", buffer.getvalue()))
    exported_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return SessionExport(bot, session_id, exported_at, events, files)


async def write_session(nc: Any, export: SessionExport, *, session_id: str, bot: str | None = None,
                        max_file_bytes: int | None = None) -> list[int]:
    """Add ``export`` as session ``session_id`` (of ``bot``, default the export's): files first, then the
    events in atomic batches. Refused before anything is written when the session exists or a file or
    event is too large for this deployment. If appending fails part way, what was written is removed.
    The new sequences."""
    js = nc.jetstream()
    log = EventLog(nc, js)
    bot = bot or export.bot
    limit = max_file_bytes if max_file_bytes is not None else Settings().max_file_bytes
    events = [_moved(e, export, bot, session_id) for _, e in export.events]
    payload_limit = nc.max_payload - ENVELOPE_BYTES
    for (seq, _), event in zip(export.events, events):
        size = len(event.model_dump_json(exclude_none=True))
        if size > payload_limit:
            raise InvalidInput(f"event seq {seq} ({event.type}) takes {size:,} bytes, over the {payload_limit:,} "
                               "this NATS server takes in one message (max_payload); nothing was imported")
    for f in export.files:
        if len(f.data) > limit:
            raise too_large(len(f.data), limit, f"file {f.file_id} ({f.name})")
    if await log.last_seq(bot, session_id):
        raise PetribusError(f"session {session_id!r} of bot {bot!r} exists already; import without "
                            "--session-id to get a new one", code="session_exists")
    store = FileStore(js, limit)
    seqs: list[int] = []
    try:
        for f in export.files:
            await store.put(bot, session_id, f.file_id, f.data, name=f.name, content_type=f.content_type)
        for start in range(0, len(events), MAX_BATCH):
            batch = events[start:start + MAX_BATCH]
            seqs += await log.append_batch(batch, expected_last_seq=seqs[-1] if seqs else 0,
                                           msg_ids=[f"import:{session_id}:{start + i}" for i in range(len(batch))])
    except WrongLastSequence:
        await _undo(log, store, bot, session_id, export.files, wrote_events=bool(seqs))
        raise PetribusError(f"session {session_id!r} of bot {bot!r} was written to while it was imported; "
                            "what the import wrote is removed, try again", code="session_exists") from None
    except BaseException:
        await _undo(log, store, bot, session_id, export.files, wrote_events=bool(seqs))
        raise
    return seqs


async def _undo(log: Any, store: Any, bot: str, session_id: str, files: list[ExportedFile], *,
                wrote_events: bool) -> None:
    """Remove what a failed import wrote (best effort: the bus may be the reason it failed)."""
    try:
        if wrote_events:
            await log.delete(bot, session_id)
        for f in files:
            await store.delete(bot, session_id, f.file_id)
    except Exception as exc:  # noqa: BLE001 - whatever failed, say what is left behind
        typer.echo(f"could not remove the partial import of session {session_id} ({type(exc).__name__}: {exc}); "
                   f"delete it by hand", err=True)


def _moved(event: Any, export: SessionExport, bot: str, session_id: str) -> Any:
    """``event`` as the new session's: its bot and session id, and file URLs that named the old session."""
    update: dict[str, Any] = {"bot": bot, "session_id": session_id}
    old = subjects.file_url(export.bot, export.session_id, "")
    for name in ("url", "upload_url"):
        value = getattr(event, name, None)
        if isinstance(value, str) and value.startswith(old):
            update[name] = subjects.file_url(bot, session_id, value[len(old):])
    return event.model_copy(update=update)


async def _bot_of(js: Any, session_id: str) -> str:
    """The bot whose log holds ``session_id`` (session ids are unique in practice, but not by rule)."""
    info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.events("*", session_id))
    bots = sorted({subjects.parse_events(s)[0] for s in info.state.subjects or {}})  # a subject per kind
    if not bots:
        raise UnknownSession(f"no session {session_id!r} in {subjects.EVENTS_STREAM}: it never existed or was "
                             "deleted (pass --bot if you know its bot)")
    if len(bots) > 1:
        raise InvalidInput(f"session id {session_id!r} exists for bots {', '.join(bots)}; pass --bot")
    return bots[0]


def _run(nats_url: str | None, action: Callable[[Any], Awaitable[T]]) -> T:
    """Connect, do ``action(connection)``, close; each failure becomes one message and an exit code."""
    url = nats_url or Settings().nats_url

    async def main() -> T:
        nc = await bus.connect(url, name="petribus-sessions", timeout=CONNECT_TIMEOUT_S, reconnect=False)
        try:
            try:
                await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
            except NotFoundError:
                raise BusError(f"NATS at {url} has no {subjects.EVENTS_STREAM} stream: no petribus deployment "
                               "uses it yet; start one (petribus serve, or a service) first") from None
            return await action(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except InvalidInput as exc:
        _fail(exc.message, EXIT_BAD_INPUT)
    except BusError as exc:
        _fail(exc.message, EXIT_NO_NATS)
    except PetribusError as exc:
        _fail(exc.message, EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - nats' own errors (no JetStream, a timeout)
        _fail(f"could not use NATS at {url}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
