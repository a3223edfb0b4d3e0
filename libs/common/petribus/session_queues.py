"""Per-session work queues: one session's items in order, every session in parallel.

A service that takes every session's events from one shared durable consumer (the scheduler, the LLM
service) hands each delivered item to :meth:`SessionQueues.put`. A session with queued items has
exactly one task; it takes what is queued (everything at once, or one item at a time), awaits the
service's ``serve`` on it, then calls ``done`` so the consumer credits those items held are given
back. The task ends when its queue is empty; the next item starts a new one.

Invariants: items of one session are never served concurrently nor out of order; a session never
waits for another; an item put while its session's task runs is served by that task (the check for
more and the task's end happen with no await between them, so no item is left behind). An exception
escaping ``serve`` is logged with the session id and does not stop the session's task nor any other:
what the service did not ack is redelivered by JetStream. :meth:`idle` returns once no task runs,
which is how a draining service (its consumer stopped) waits for the items it already holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

from petribus import logs

Key = tuple[str, str]  # (bot, session id)
T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[Any]"]


class SessionQueues(Generic[T]):
    """A FIFO and a task per session. ``serve(key, items)`` gets the session's queued items: all of
    them (``one_at_a_time=False``: a burst costs one call) or one per call. ``done(items)`` runs after
    each call, whatever it raised, and for items dropped when a task is cancelled.

    ``spawn`` starts the tasks (a service passes its supervised ``spawn``, so its stop cancels them).
    """

    def __init__(self, serve: Callable[[Key, list[T]], Awaitable[None]], *, one_at_a_time: bool = False,
                 done: Callable[[list[T]], None] | None = None, spawn: Spawn | None = None,
                 log: Any = None) -> None:
        self._serve = serve
        self._one = one_at_a_time
        self._done = done
        self._spawn = spawn or self._create_task
        self._log = log or logs.get("petribus.sessions")
        self._queues: dict[Key, deque[T]] = {}  # a key is here exactly while its task runs
        self._tasks: set[asyncio.Task[Any]] = set()  # only those started by the default spawn
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, key: Key, item: T) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._idle.clear()
            self._spawn(self._run(key, queue), f"session:{key[1]}")
        queue.append(item)

    def waiting(self, key: Key) -> Iterator[T]:
        """The session's items not yet taken by its task (the one being served is not among them)."""
        return iter(tuple(self._queues.get(key, ())))

    def __len__(self) -> int:
        """Sessions with a running task."""
        return len(self._queues)

    async def idle(self) -> None:
        await self._idle.wait()

    async def _run(self, key: Key, queue: deque[T]) -> None:
        try:
            while queue:
                if self._one:
                    items = [queue.popleft()]
                else:
                    items = list(queue)
                    queue.clear()
                try:
                    await self._serve(key, items)
                except Exception as exc:  # a bug in serve: this session's items come back; others go on
                    self._log.error("session step failed", session_id=key[1], error=repr(exc), exc_info=exc)
                finally:
                    if self._done is not None:
                        self._done(items)
        finally:
            if queue and self._done is not None:  # cancelled: these were never served
                self._done(list(queue))
            del self._queues[key]
            if not self._queues:
                self._idle.set()

    def _create_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)
        return task
