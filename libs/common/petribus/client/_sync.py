"""The client for code that does not run an event loop: every call blocks until it is done.

``SyncClient`` owns one event loop in a daemon thread and runs the async ``Client``'s calls there
(``asyncio.run_coroutine_threadsafe``), so a script, a notebook cell or a Flask view can use it as it
is. Do not call it from inside a running event loop's thread with the expectation of concurrency: each
call blocks that thread until its answer came.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel

from petribus.client._event import Event
from petribus.client._session import Client, RunResult, Session, State, Step, Uploaded

T = TypeVar("T")


class SyncClient:
    """``Client`` with blocking calls. ``with SyncClient(url) as client:`` or call ``close()``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, *,
                 timeout: float = 60.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="petribus-client", daemon=True)
        self._thread.start()
        self.client = Client(url, token, timeout=timeout)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def pull(self, items: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator, each fetched on the client's loop."""

        async def following() -> T:
            return await anext(items)

        while True:
            try:
                yield self.call(following())
            except StopAsyncIteration:
                return

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.call(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def session(self, bot: str, session_id: str | None = None) -> SyncSession:
        """Session ``session_id`` of ``bot``; a new session (made now) when ``session_id`` is None."""
        return SyncSession(self, self.call(self.client.session(bot, session_id)._created()))

    def bots(self) -> list[dict[str, Any]]:
        return self.call(self.client.bots())

    def sessions(self, bot: str) -> dict[str, int]:
        return self.call(self.client.sessions(bot))


class SyncSession:
    """``Session`` with blocking calls; ``session`` is the async one underneath."""

    def __init__(self, owner: SyncClient, session: Session) -> None:
        self.owner = owner
        self.session = session

    @property
    def bot(self) -> str:
        return self.session.bot

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    def add(self, marker: BaseModel | str, data: dict[str, Any] | None = None, *, key: str | None = None) -> Event:
        return self.owner.call(self.session.add(marker, data, key=key))

    def say(self, text: str, *, key: str | None = None) -> Event:
        return self.owner.call(self.session.say(text, key=key))

    def accept(self, task_id: str, *, key: str | None = None) -> Event:
        return self.owner.call(self.session.accept(task_id, key=key))

    def reject(self, task_id: str, reason: str | None = None, *, key: str | None = None) -> Event:
        return self.owner.call(self.session.reject(task_id, reason, key=key))

    def answer(self, request_id: str, accepted: bool, *, key: str | None = None) -> Event:
        return self.owner.call(self.session.answer(request_id, accepted, key=key))

    def upload(self, file_id: str, path: str | Path, *, name: str | None = None, key: str | None = None) -> Uploaded:
        return self.owner.call(self.session.upload(file_id, path, name=name, key=key))

    def download(self, file: str, target: str | Path) -> Path:
        return self.owner.call(self.session.download(file, target))

    def state(self, at: int | None = None, *, events: bool = True) -> State:
        return self.owner.call(self.session.state(at, events=events))

    def fork(self, at: int, *, bot: str | None = None, key: str | None = None) -> SyncSession:
        return SyncSession(self.owner, self.owner.call(self.session.fork(at, bot=bot, key=key)))

    def follow_handoff(self, event: Event | None = None, *, timeout: float = 30.0) -> SyncSession:
        """As ``Session.follow_handoff``: the session the conversation was handed over to."""
        return SyncSession(self.owner, self.owner.call(self.session.follow_handoff(event, timeout=timeout)))

    def halt(self, before: Iterable[str], *, key: str | None = None) -> Event:
        return self.owner.call(self.session.halt(before, key=key))

    def delete(self) -> None:
        self.owner.call(self.session.delete())

    def run(self, *, halt_after: Iterable[str] = (), halt_before: Iterable[str] = (),
            add: Iterable[BaseModel | tuple[str, dict[str, Any]]] = (), since: int | None = None,
            timeout: float | None = None) -> RunResult:
        """As ``Session.run``; the result's state is ``state(at=result.seq)`` here."""
        return self.owner.call(self.session.run(halt_after=halt_after, halt_before=halt_before, add=add,
                                                since=since, timeout=timeout))

    def events(self, since: int | None = None, *, deltas: bool = False) -> Iterator[Event]:
        """The session's events after ``since``, blocking for each; closed when the loop over it ends."""
        stream = self.session.events(since, deltas=deltas)
        try:
            yield from self.owner.pull(stream)
        finally:
            self.owner.call(stream.close())

    def history(self, after: int = 0, *, page: int = 100) -> Iterator[Step]:
        """As ``Session.history``, one step at a time."""
        steps = self.session.history(after, page=page)
        try:
            yield from self.owner.pull(steps)
        finally:
            self.owner.call(steps.aclose())
