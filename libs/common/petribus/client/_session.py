"""``Client`` (one gateway) and ``Session`` (one session of one bot): the calls a program makes.

Writes go over REST with an ``Idempotency-Key`` (``_http``), so each returns the event it appended, or
raises what went wrong, and a retry lands once. Events come over the WebSocket (``_stream``), resumed
without gaps. ``Session.run`` is both: it notes where the log stands, then watches what follows for the
transition it was told to stop at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Literal, Self
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from petribus.client._errors import ClientError, NotFound, RunFailed, Unavailable
from petribus.client._event import Event, decode
from petribus.client._http import Rest, new_key, refusal
from petribus.client._stream import EventStream, Notice
from petribus.events import Marker

CHUNK = 256 * 1024


@dataclass(frozen=True)
class State:
    """A session as of ``last_seq``: its marking and what is under way (``GET .../sessions/{id}``)."""

    bot: str
    session_id: str
    last_seq: int
    marking: dict[str, list[Marker]]
    """Location -> the markers it holds, oldest first."""
    in_flight: list[dict[str, Any]]
    """Firings that took their inputs and have not ended: ``firing_id``, ``transition``, ``status``
    (``awaiting_confirmation``, ``claimed``, ``started``), ``consumed``, ``fired_seq``, ``attempts``."""
    pending_requests: list[dict[str, Any]]
    """Questions (``confirm_request``) and file requests (``input_file_request``) not yet answered."""
    events: list[Event] = field(repr=False)
    chat: list[dict[str, Any]] = field(repr=False)
    memory: list[Any] = field(repr=False)
    files: list[dict[str, Any]] = field(repr=False)
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> State:
        return cls(
            bot=body["bot"], session_id=body["session_id"], last_seq=body["last_seq"],
            marking={loc: [Marker.model_validate(m) for m in ms] for loc, ms in body["marking"].items()},
            in_flight=body.get("in_flight", []), pending_requests=body.get("pending_requests", []),
            events=[decode(e) for e in body.get("events", [])], chat=body.get("chat", []),
            memory=body.get("memory", []), files=body.get("files", []), raw=body,
        )

    def counts(self) -> dict[str, int]:
        """Location -> how many markers it holds (locations holding none are left out)."""
        return {loc: len(ms) for loc, ms in self.marking.items() if ms}

    def data(self, location: str) -> list[dict[str, Any]]:
        """The data of the markers at ``location``, oldest first."""
        return [m.data for m in self.marking.get(location, [])]


@dataclass(frozen=True)
class RunResult:
    """Where ``Session.run`` stopped: ``event`` is the ``transition_completed`` (``halted="after"``) or
    the ``confirm_transition`` (``halted="before"``: continue with ``accept(result.task_id)``)."""

    event: Event
    halted: Literal["before", "after"]
    session: Session = field(repr=False)

    @property
    def seq(self) -> int:
        assert self.event.seq is not None
        return self.event.seq

    @property
    def task_id(self) -> str | None:
        return self.event.task_id

    @property
    def transition(self) -> str | None:
        return self.event.transition

    async def state(self) -> State:
        """The session's state as of this event (later events left out)."""
        return await self.session.state(at=self.seq)


@dataclass(frozen=True)
class Step:
    """One step of a session's history: an event and what it changed in the marking."""

    seq: int
    event: Event
    added: list[Marker]
    """Markers it put into places (added, output, or given back by a failed or rejected firing)."""
    consumed: list[Marker]
    """Markers it took out of places (a firing's claim)."""


@dataclass(frozen=True)
class Uploaded:
    """A file request answered: ``stored_id`` is where its bytes are (downloadable at ``url``)."""

    file_id: str
    stored_id: str
    name: str
    size: int
    url: str
    seq: int
    replayed: bool = False


class Client:
    """The gateway at ``url`` (``http://host:port``; a ``ws://`` base works too).

    ``token`` (an API key from ``petribus keys create``; default: ``$PETRIBUS_API_KEY``, if set) goes out as
    ``Authorization: Bearer TOKEN`` on every request and WebSocket (docs/security.md). Use it as
    ``async with Client(url) as client:``, or call ``aclose()``: that also closes the event streams
    its sessions opened.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, *,
                 timeout: float = 60.0) -> None:
        base = url.rstrip("/")
        self.http_base = base.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.ws_base = self.http_base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        token = token if token is not None else os.environ.get("PETRIBUS_API_KEY")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.rest = Rest(self.http_base, headers=self.headers, timeout=timeout)
        self._streams: set[EventStream] = set()  # open ones: each leaves when it is closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for stream in list(self._streams):
            await stream.close()
        await self.rest.aclose()

    def session(self, bot: str, session_id: str | None = None) -> Session:
        """Session ``session_id`` of ``bot``; ``await`` it to start a new one when ``session_id`` is None."""
        return Session(self, bot, session_id)

    async def bots(self) -> list[dict[str, Any]]:
        """Every bot the gateway serves: its exposed locations (with JSON schemas) and transitions."""
        return list(await self.rest.call("GET", "/bots"))

    async def sessions(self, bot: str) -> dict[str, int]:
        """The bot's sessions still in the log -> the number of events each holds."""
        body = await self.rest.call("GET", f"/bots/{quote(bot)}/sessions")
        return {s["session_id"]: s["events"] for s in body["sessions"]}

    def stream(self, bot: str, session_id: str | None = None, *, since: int | None = None,
               deltas: bool = False, on_notice: Notice | None = None) -> EventStream:
        """An ``EventStream`` of the session (a new session when ``session_id`` is None); ``on_notice``
        hears what it does on its own (reconnecting, resending), else the ``petribus.client`` logger."""
        stream = EventStream(self.ws_base, bot, session_id, since=since, headers=self.headers, deltas=deltas,
                             on_notice=on_notice, on_close=self._streams.discard)
        self._streams.add(stream)
        return stream


class Session:
    """One session of ``bot``. ``session_id`` is None until a new one is made (``await`` the session)."""

    def __init__(self, client: Client, bot: str, session_id: str | None = None) -> None:
        self.client = client
        self.bot = bot
        self.session_id = session_id

    def __repr__(self) -> str:
        return f"Session(bot={self.bot!r}, session_id={self.session_id!r})"

    def __await__(self) -> Generator[Any, None, Session]:
        return self._created().__await__()

    async def _created(self) -> Session:
        if self.session_id is None:
            body = await self.client.rest.call("POST", f"/bots/{quote(self.bot)}/sessions")
            self.session_id = body["session_id"]
        return self

    def _id(self) -> str:
        if self.session_id is None:
            raise ClientError("this session has no id yet: `await client.session(bot)` makes a new one",
                              code="no_session")
        return self.session_id

    @property
    def path(self) -> str:
        return f"/bots/{quote(self.bot)}/sessions/{quote(self._id())}"

    async def _appended(self, method: str, path: str, body: Any, key: str | None) -> Event:
        answer = await self.client.rest.call(method, path, json=body, key=key or new_key())
        return decode(answer["event"])

    async def add(self, marker: BaseModel | str, data: dict[str, Any] | None = None, *,
                  key: str | None = None) -> Event:
        """Add a marker: a model instance (its class name is the location), or a location name and its data.

        Returns the ``marker_added`` event; ``Invalid`` when the data does not validate. ``key`` is the
        write's idempotency key (a new one by default): the same key adds it once.
        """
        if isinstance(marker, BaseModel):
            if data is not None:
                raise TypeError("add(model) takes the data from the model; pass add('Location', {...}) instead")
            location, data = type(marker).__name__, marker.model_dump(mode="json")
        else:
            location, data = marker, data or {}
        return await self._appended("POST", f"{self.path}/markers", {"location": location, "data": data}, key)

    async def say(self, text: str, *, key: str | None = None) -> Event:
        """Say ``text`` as the session's user; returns the ``user_message`` event."""
        return await self._appended("POST", f"{self.path}/messages", {"text": text}, key)

    async def accept(self, task_id: str, *, key: str | None = None) -> Event:
        """Run a firing that waits for confirmation (the ``task_id`` of its ``confirm_transition``)."""
        return await self._appended("POST", f"{self.path}/confirmations/{quote(task_id)}",
                                    {"accepted": True}, key)

    async def reject(self, task_id: str, reason: str | None = None, *, key: str | None = None) -> Event:
        """Do not run it: its markers go back and are not offered to that transition again."""
        body: dict[str, Any] = {"accepted": False}
        if reason is not None:
            body["reason"] = reason
        return await self._appended("POST", f"{self.path}/confirmations/{quote(task_id)}", body, key)

    async def answer(self, request_id: str, accepted: bool, *, key: str | None = None) -> Event:
        """Answer a running transition's ``context.confirm`` (the ``request_id`` of its ``confirm_request``)."""
        return await self._appended("POST", f"{self.path}/confirm_requests/{quote(request_id)}",
                                    {"accepted": accepted}, key)

    async def upload(self, file_id: str, path: str | Path, *, name: str | None = None,
                     key: str | None = None) -> Uploaded:
        """Answer the file request ``file_id`` (an ``input_file_request``) with the file at ``path``.

        The file is streamed, never read whole; ``Invalid`` (code ``file_too_large``) when the gateway
        takes fewer bytes, ``Conflict`` when the request no longer waits.
        """
        path = Path(path)
        size = path.stat().st_size

        @contextlib.contextmanager
        def body() -> Iterator[AsyncIterator[bytes]]:
            with open(path, "rb") as fh:
                yield _chunks(fh)

        answer = await self.client.rest.call(
            "PUT", f"{self.path}/files/{quote(file_id)}", params={"name": name or path.name},
            key=key or new_key(), content=body, headers={"content-length": str(size)})
        return Uploaded(**{f.name: answer[f.name] for f in fields(Uploaded) if f.name in answer})

    async def download(self, file: str, target: str | Path) -> Path:
        """Save one of the session's files (a file id, or the ``url`` of its event) at ``target``."""
        url = file if file.startswith(("/", "http://", "https://")) else f"{self.path}/files/{quote(file)}"
        target = Path(target)
        try:
            async with self.client.rest.stream("GET", url) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise refusal("GET", url, resp)
                out = await asyncio.to_thread(open, target, "wb")
                with out:
                    async for chunk in resp.aiter_bytes():
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise Unavailable(f"GET {url}: {type(exc).__name__}: {exc}; download it again", code="unreachable") from exc
        return target

    def events(self, since: int | None = None, *, deltas: bool = False) -> EventStream:
        """The session's events after ``since`` (from its start when None), as they land, for as long as
        it is read. A dropped connection is resumed where it stopped: none missed, none repeated.

        ``async with s.events() as stream: async for ev in stream: ...`` closes it when done.
        """
        return self.client.stream(self.bot, self._id(), since=since, deltas=deltas)

    async def state(self, at: int | None = None, *, events: bool = True) -> State:
        """The session's state now, or as of sequence ``at`` (its ``last_seq`` is then the last event at
        or before ``at``). ``events=False`` leaves the events out (a long session's are many)."""
        params: dict[str, Any] = {} if events else {"events": "false"}
        if at is not None:
            params["at"] = at
        return State.of(await self.client.rest.call("GET", self.path, params=params))

    async def history(self, after: int = 0, *, page: int = 100) -> AsyncGenerator[Step, None]:
        """The session's steps after sequence ``after``, oldest first: each event with the markers it
        added and consumed. Read in pages of ``page``; ends at the step that was last when it got there."""
        while True:
            body = await self.client.rest.call("GET", f"{self.path}/history",
                                               params={"after": after, "limit": page})
            for step in body["steps"]:
                yield Step(seq=step["seq"], event=decode(step["event"]),
                           added=[Marker.model_validate(m) for m in step.get("added", [])],
                           consumed=[Marker.model_validate(m) for m in step.get("consumed", [])])
            if body.get("next") is None:
                return
            after = body["next"]

    async def fork(self, at: int, *, bot: str | None = None, key: str | None = None) -> Session:
        """A new session that starts from this one's state as of sequence ``at`` (of ``bot``, this bot by
        default). Firings in flight then are re-decided there; this session is not touched."""
        body: dict[str, Any] = {"at": at}
        if bot is not None:
            body["bot"] = bot
        made = await self.client.rest.call("POST", f"{self.path}/fork", json=body, key=key or new_key())
        return Session(self.client, made.get("bot") or bot or self.bot, made["session_id"])

    async def follow_handoff(self, event: Event | None = None, *, timeout: float = 30.0) -> Session:
        """The session this one's bot handed the conversation over to (docs/handoffs.md): the one a
        ``handed_off`` ``event`` names, else the latest hand-off in the log. Waits (up to ``timeout``
        seconds) until that session exists: it is opened right after the ``handed_off`` lands.
        ``NotFound`` when there is no hand-off, or its session did not appear in time."""
        if event is None:
            found = [e for e in (await self.state()).events if e.handoff is not None]
            if not found:
                raise NotFound(f"session {self._id()} of bot {self.bot!r} has not been handed over to another bot")
            event = found[-1]
        if event.handoff is None:
            raise ValueError(f"follow_handoff takes a handed_off event, not a {event.type}")
        target = Session(self.client, *event.handoff)
        delay, deadline = 0.05, asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await target.state(events=False)
                return target
            except NotFound:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise NotFound(f"session {target.session_id} of bot {target.bot!r}, which the conversation "
                                   f"was handed over to, did not appear within {timeout:g}s") from None
                await asyncio.sleep(delay)  # the handed_off lands just before its session opens
                delay = min(1.0, delay * 2)

    async def halt(self, before: Iterable[str], *, key: str | None = None) -> Event:
        """Hold every new firing of ``before`` for ``accept``/``reject``, as if it were ``confirm=True``.

        Replaces the set held before; ``halt([])`` clears it. Returns the ``halt_set`` event.
        """
        return await self._appended("PUT", f"{self.path}/halt", {"before": list(before)}, key)

    async def delete(self) -> None:
        """Delete the session's log and files, for good."""
        await self.client.rest.call("DELETE", self.path)

    async def run(self, *, halt_after: Iterable[str] = (), halt_before: Iterable[str] = (),
                  add: Iterable[BaseModel | tuple[str, dict[str, Any]]] = (), since: int | None = None,
                  timeout: float | None = None) -> RunResult:
        """Let the session run until a named transition completes (``halt_after``) or is about to fire
        (``halt_before``); return where it stopped, like Burr's ``Application.run``.

        Only events after ``since`` count (default: the log's last sequence when ``run`` begins): a
        transition that completed, or a firing held for confirmation, earlier does not stop it. ``add``
        (models, or ``(location, data)`` pairs) is added once the run watches and the halt is set, so
        what it sets off is never missed; or pass the ``seq`` of an earlier write as ``since``.

        ``halt_before`` sets the session's halt set to exactly those transitions (``halt``) and leaves it
        set, like a breakpoint: the held firing waits for ``accept(result.task_id)`` or ``reject``, and so
        does every later firing of them until ``halt([])``. A firing claimed before the halt was set
        runs unheld. ``halt_after`` alone leaves the halt set as it is.

        Raises ``RunFailed`` when a named transition fails for good (its final ``transition_failed``;
        one that will be retried does not count), and ``TimeoutError`` after ``timeout`` seconds: a
        session where nothing named happens would otherwise be watched forever.
        """
        after, before = set(halt_after), set(halt_before)
        if not after and not before:
            raise ValueError("run needs halt_after=[...] or halt_before=[...]: the transitions to stop at")
        async with asyncio.timeout(timeout):
            start = await self._last_seq() if since is None else since
            if before:
                await self.halt(sorted(before))
            for marker in add:
                await (self.add(marker) if isinstance(marker, BaseModel) else self.add(*marker))
            async with self.events(since=start) as stream:
                async for event in stream:
                    if event.type == "transition_completed" and event.transition in after:
                        return RunResult(event, "after", self)
                    if event.type == "confirm_transition" and event.transition in before:
                        return RunResult(event, "before", self)
                    if event.type == "transition_failed" and event.final and event.transition in after | before:
                        raise RunFailed(event)
        raise ClientError("the session's event stream ended before a named transition was reached",
                          code="stream_ended")

    async def _last_seq(self) -> int:
        return (await self.state(events=False)).last_seq


async def _chunks(fh: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk
