"""Fork a session: a new session that starts from another's state at one of its sequences.

The new session's log begins with one ``session_forked`` event holding that state: the marking, the
chat, the memory and the files; then, if the source held transitions back at that sequence, a
``halt_set`` with those the target net has (a fork behaves as its source would have from there). The
deployment environment the source was started in is not carried (docs/time-travel.md says why).

The rule for firings in flight at that sequence (claimed, running or waiting for a confirmation):
**their consumed markers come back**, in their places and FIFO order, and the fork decides afresh what
fires. Nothing half-run is carried over, so no effect of a run that had not finished at that sequence
(a message, a question, a file) is in the fork, and the fork's scheduler may fire the same transition
again, on code that may have changed since. Markers are offered to every transition again (a rejection
in the source does not block them in the fork).

The fork may target another bot, or a changed version of the same one: every marker must have a
location of the target net and validate against its model (its data is stored as the target model
dumps it, defaults included). Markers that do not fit are all reported at once and nothing is written.
The events are appended as one atomic batch to the new, empty subject, after the files are copied:
either the whole fork exists or the session id does not. A copy is deleted again when the fork did not
land: when copying fails half-way, and when the append fails (unless the log shows the batch landed
after all, its answer lost, or another fork under the same id names the copy: a keyed retry racing
the first one).
"""

from __future__ import annotations

import io
from pydantic import ValidationError

from petribus.bus import MAX_BATCH, EventLog, WrongLastSequence
from petribus.core import PlacedMarker, SessionState
from petribus.errors import InvalidInput
from petribus.events import (
    Actor,
    ForkedFile,
    ForkedTurn,
    HaltSet,
    InputFileResponse,
    Marker,
    MarkerAdded,
    SessionForked,
    _Event,
    encode,
)
from petribus.files import FileStore, header
from petribus.net import Net

ENVELOPE_BYTES = 4096  # room for the subject, headers and protocol line within max_payload
MAX_PROBLEMS = 50  # listed in full; the count says how many more


class ForkDoesNotFit(InvalidInput):
    """The source's markers do not fit the target net."""

    code = "fork_does_not_fit"


def marking_with_in_flight(state: SessionState) -> tuple[list[Marker], list[str]]:
    """The markers of ``state`` with those of its firings in flight put back, in FIFO order per location
    (by when each first entered the net); and the ids of those firings."""
    placed: dict[str, list[PlacedMarker]] = {loc: list(ms.values()) for loc, ms in state.places.items()}
    for f in state.in_flight.values():
        for p in f.consumed:
            placed.setdefault(p.marker.location, []).append(p)
    markers = [p.marker for ps in placed.values() for p in sorted(ps, key=lambda p: p.order)]
    return markers, list(state.in_flight)


def fit(net: Net, markers: list[Marker]) -> list[Marker]:
    """The markers as the target net stores them; ``ForkDoesNotFit`` listing every one that does not fit."""
    problems: list[str] = []
    fitted: list[Marker] = []
    for m in markers:
        loc = net.locations.get(m.location)
        if loc is None:
            problems.append(f"marker {m.id} is at location {m.location!r}, which bot {net.bot!r} does not have")
            continue
        try:
            data = loc.model.model_validate(m.data).model_dump(mode="json")
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                              for e in exc.errors(include_url=False))
            problems.append(f"marker {m.id} at {m.location} does not validate against {net.bot}'s "
                            f"{loc.model.__name__}: {where}")
            continue
        fitted.append(Marker(id=m.id, location=m.location, data=data))
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ForkDoesNotFit(
            f"{len(problems)} of {len(markers)} marker(s) do not fit bot {net.bot!r}, so nothing was forked: "
            + "; ".join(shown) + more
            + ". Fork at a sequence where they are gone, or change the bot so that they fit")
    return fitted


def opening(net: Net, session_id: str, source: SessionState, at: int, markers: list[Marker],
            in_flight: list[str], files: list[ForkedFile], max_payload: int, actor: Actor | None = None
            ) -> list[_Event]:
    """``session_forked`` with as many markers as fit in one message, the source's halts (``halt_set``) if
    it had any the target net can hold, then ``marker_added`` events for the rest of the markers: at most
    ``MAX_BATCH`` events, one atomic batch. ``actor`` (who forked) owns the new session."""
    forked = SessionForked(
        bot=net.bot, session_id=session_id, source_bot=source.bot, source_session=source.session_id,
        source_seq=at, chat=[ForkedTurn(role=t.role, text=t.text) for t in source.chat],
        memory=list(source.memory), files=files, in_flight=in_flight, actor=actor)
    limit = max_payload - ENVELOPE_BYTES
    room = limit - len(encode(forked))
    if room < 0:
        raise InvalidInput(
            f"the session's chat, memory and file list at seq {at} take {len(encode(forked)):,} bytes, over the "
            f"{limit:,} bytes one event may hold (nats-server max_payload); it cannot be forked as it is",
            code="fork_too_large")
    carried: list[Marker] = []
    rest = iter(markers)
    for m in rest:
        size = len(m.model_dump_json()) + 1
        if size > room:
            rest = iter([m, *rest])
            break
        carried.append(m)
        room -= size
    events: list[_Event] = [forked.model_copy(update={"markers": carried})]
    halted = sorted(t for t in source.halt_before if net.has_transition(t))
    if halted:
        events.append(HaltSet(bot=net.bot, session_id=session_id, before=halted, cause=forked.id, actor=actor))
    events.extend(MarkerAdded(bot=net.bot, session_id=session_id, marker=m, source="fork", cause=forked.id,
                              actor=actor) for m in rest)
    if len(events) > MAX_BATCH:
        raise InvalidInput(
            f"forking at seq {at} takes {len(events)} events ({len(markers)} markers), over the {MAX_BATCH} one "
            "atomic batch may hold; fork at a sequence with fewer markers", code="fork_too_large")
    return events


async def copy_files(store: FileStore, source: SessionState, bot: str, session_id: str) -> list[ForkedFile]:
    """Copy the bytes of every file of ``source`` into the new session, under the same ids; if one copy
    fails, the ones made before it are deleted again."""
    copied: list[ForkedFile] = []
    try:
        for key, f in source.files.items():
            info = await store.info(source.bot, source.session_id, key)
            if info is None:
                continue  # its bytes are gone (deleted): the fork lists only what it can serve
            buffer = io.BytesIO()
            await store.get_into(source.bot, source.session_id, key, buffer)
            content_type = f.content_type or header(info, "Content-Type") or "application/octet-stream"
            size = await store.put(bot, session_id, key, buffer.getvalue(), name=f.name, content_type=content_type)
            copied.append(ForkedFile(file_id=key, name=f.name, size=size, content_type=content_type,
                                     direction="input" if isinstance(f, InputFileResponse) else "output"))
    except BaseException as exc:
        await _undo(store, bot, session_id, copied, exc)
        raise
    return copied


async def fork(events: EventLog, store: FileStore, net: Net, source: SessionState, at: int,
               session_id: str, actor: Actor | None = None) -> int:
    """Make the fork of ``source`` (the state at ``at``) as session ``session_id`` of ``net``, owned by
    ``actor``'s owner: its first seq. ``WrongLastSequence`` when that session exists already."""
    markers, in_flight = marking_with_in_flight(source)
    fitted = fit(net, markers)
    # Checked for size before any bytes are copied; copied before any event lands (the events name them).
    opening(net, session_id, source, at, fitted, in_flight, [], events.nc.max_payload, actor)
    if await events.last_seq(net.bot, session_id):
        # A keyed retry of a fork that exists: copying would write into that session's files.
        raise WrongLastSequence(f"session {session_id} of bot {net.bot!r} exists already")
    files = await copy_files(store, source, net.bot, session_id)
    batch = opening(net, session_id, source, at, fitted, in_flight, files, events.nc.max_payload, actor)
    try:
        seqs = await events.append_batch(batch, expected_last_seq=0,
                                         msg_ids=[f"fork:{session_id}:{i}" for i in range(len(batch))])
    except Exception as exc:
        landed = await _landed(events, net.bot, session_id, batch[0], files, store, exc)
        if landed is None:
            raise
        return landed
    return seqs[0]


async def _landed(events: EventLog, bot: str, session_id: str, first: _Event, files: list[ForkedFile],
                  store: FileStore, exc: BaseException) -> int | None:
    """The append of the fork failed with ``exc``: the fork's first seq if it landed after all (an answer
    lost on the way); else None, with the copies no ``session_forked`` of this session id names deleted.
    A log that cannot be read leaves every copy in place (a fork that landed keeps its files), noted on
    ``exc``."""
    try:
        last = await events.last_seq(bot, session_id)
        head = (await events.read(bot, session_id, at_least=last))[:1] if last else []
    except Exception as read_exc:
        exc.add_note(f"the fork's copied files ({len(files)}) were left in place: whether the fork landed "
                     f"could not be read ({read_exc!r})")
        return None
    if head and head[0][1].id == first.id:
        return head[0][0]
    named = {f.file_id for f in head[0][1].files} if head and isinstance(head[0][1], SessionForked) else set()
    await _undo(store, bot, session_id, [f for f in files if f.file_id not in named], exc)
    return None


async def _undo(store: FileStore, bot: str, session_id: str, copied: list[ForkedFile], exc: BaseException) -> None:
    """Delete the copies of a fork that did not land; one that cannot be deleted is noted on ``exc``."""
    for f in copied:
        try:
            await store.delete(bot, session_id, f.file_id)
        except Exception as delete_exc:
            exc.add_note(f"file {f.file_id} copied into session {session_id} could not be deleted "
                         f"({delete_exc!r}); it is named by no event")
