"""Which worker runs which firing: leases on the pool's workers, counted, with no I/O.

A firing takes a *lease* on a worker before it runs there and gives it back when it is done:

- An ``async def`` firing shares. It goes to the least-loaded worker in service that holds no sync
  firing and fewer than ``concurrency`` async ones (``PETRIBUS_WORKER_CONCURRENCY``); there it runs as
  a task on the worker's event loop, so a few processes hold thousands of firings waiting on I/O.
- A ``def`` firing has a worker to itself: one with nothing leased and no run still winding down, and
  nothing else is placed there until it is done.
- Firings that find no room wait and are served in order, sync ones first, as room comes back. While
  sync firings wait, as many of the least-loaded shared workers take no new async firings: they drain,
  so a stream of async work cannot starve sync work.
- A waiting firing is also woken, with no lease, when a worker may be started (``size`` allows it):
  it starts one for itself (``pool.py`` does the starting).
- Every worker has a *key*: the sandbox profile it booted with (its limits, environment, devices). A
  firing only goes to a worker of its own key, so one transition's limits or secrets never apply to
  another's. ``size`` counts workers of every key together; when it is reached and a firing's key has
  no room, an idle worker of another key is evicted (``on_evict``) to make room for one of its key.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from petribus.errors import PetribusError


DEFAULT_KEY: Any = None


class Host:
    """A worker as placement sees it."""

    def __init__(self, key: Any = DEFAULT_KEY) -> None:
        self.key = key  # its sandbox profile: only firings of the same key go here
        self.load = 0  # leases held: firings placed here, running or about to
        self.exclusive = False  # a sync firing holds it
        self.jobs: dict[int, Any] = {}  # runs not over there yet (a cancelled one until it confirms)


H = TypeVar("H", bound=Host)


class Lease(Generic[H]):
    """Room for one firing on one worker, until it is given back."""

    __slots__ = ("exclusive", "held", "host")

    def __init__(self, host: H, exclusive: bool) -> None:
        self.host = host
        self.exclusive = exclusive
        self.held = True

    def __repr__(self) -> str:
        return f"Lease({self.host!r}, {'sync' if self.exclusive else 'async'})"


class _Queue(Generic[H]):
    """The firings of one key waiting for room, sync ones first."""

    __slots__ = ("asyncs", "sync_waiting", "syncs")

    def __init__(self) -> None:
        self.syncs: deque[asyncio.Future[Lease[H] | None]] = deque()
        self.asyncs: deque[asyncio.Future[Lease[H] | None]] = deque()
        self.sync_waiting = 0  # undecided futures in syncs


class Placement(Generic[H]):
    """The workers in service, the ones being started, and the firings waiting for room."""

    def __init__(self, size: int, concurrency: int, on_evict: Callable[[H], None] | None = None) -> None:
        self.size = max(1, size)
        self.concurrency = max(1, concurrency)
        self.hosts: list[H] = []  # in service
        self.starting = 0  # being started, counted against size
        self.closed = False
        self.on_evict = on_evict  # an idle worker taken out of service to make room for another key
        self._queues: dict[Any, _Queue[H]] = {}

    def take(self, asynchronous: bool, key: Any = DEFAULT_KEY) -> Lease[H] | None:
        """A lease on the best worker of ``key`` with room for a firing of this kind now, if there is one."""
        if not asynchronous:
            for host in self.hosts:
                if host.load == 0 and not host.jobs and (host.key is key or host.key == key):
                    return self._lease(host, False)
            return None
        shared: list[H] = self.hosts
        queue = self._queues.get(key)
        if queue is not None and queue.sync_waiting:
            shared = sorted((h for h in self.hosts if not h.exclusive and (h.key is key or h.key == key)),
                            key=_load)[queue.sync_waiting:]
        best: H | None = None
        for host in shared:
            if (not host.exclusive and host.load < self.concurrency and (host.key is key or host.key == key)
                    and (best is None or host.load < best.load)):
                best = host
        return None if best is None else self._lease(best, True)

    def give_back(self, lease: Lease[H]) -> None:
        if not lease.held:
            return
        lease.held = False
        lease.host.load -= 1
        if lease.exclusive:
            lease.host.exclusive = False
        self.serve()

    async def wait(self, asynchronous: bool, key: Any = DEFAULT_KEY) -> Lease[H] | None:
        """Queue for room: a lease, or None when a worker may be started instead."""
        waiter: asyncio.Future[Lease[H] | None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if asynchronous:
            queue.asyncs.append(waiter)
        else:
            queue.syncs.append(waiter)
            queue.sync_waiting += 1
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                if not asynchronous:
                    queue.sync_waiting -= 1
            elif waiter.exception() is None and (lease := waiter.result()) is not None:
                self.give_back(lease)  # served, but given up before it could use it
            raise

    def can_start(self) -> bool:
        return not self.closed and len(self.hosts) + self.starting < self.size

    def reserve_start(self, key: Any = DEFAULT_KEY) -> bool:
        """Count a worker of ``key`` about to be started against ``size``, if there is room for it (an
        idle worker of another key is evicted to make room)."""
        if self.closed:
            return False
        if not self.can_start() and not self._evict_for(key):
            return False
        self.starting += 1
        return True

    def _evict_for(self, key: Any) -> bool:
        """Take an idle worker of another key out of service, so that one of ``key`` may start."""
        for host in self.hosts:
            if host.load == 0 and not host.jobs and host.key is not key and host.key != key:
                self.hosts.remove(host)
                if self.on_evict is not None:
                    self.on_evict(host)
                return True
        return False

    def start_failed(self) -> None:
        self.starting -= 1
        self.serve()  # the room it would have taken is free again

    def add(self, host: H, asynchronous: bool | None = None) -> Lease[H] | None:
        """A started worker enters service; with ``asynchronous`` given, its starter's lease comes first."""
        self.starting -= 1
        self.hosts.append(host)
        lease = None if asynchronous is None else self._lease(host, asynchronous)
        self.serve()
        return lease

    def remove(self, host: H) -> None:
        """A worker leaves service for good (its leases stay counted until given back)."""
        if host in self.hosts:
            self.hosts.remove(host)
        self.serve()  # room to start another

    def serve(self) -> None:
        """Hand the room there is to waiting firings, in order within each key, sync ones first."""
        if self.closed:
            return
        starts = self.size - len(self.hosts) - self.starting
        for key, queue in list(self._queues.items()):
            for waiters, asynchronous in ((queue.syncs, False), (queue.asyncs, True)):
                while waiters:
                    waiter = waiters[0]
                    if waiter.done():  # it gave up waiting
                        waiters.popleft()
                        continue
                    lease = self.take(asynchronous, key)
                    if lease is None:
                        if starts <= 0 and not self._evict_for(key):
                            break
                        starts = max(0, starts - 1)  # no room, but a worker may start: the waiter starts it
                    waiters.popleft()
                    if not asynchronous:
                        queue.sync_waiting -= 1
                    waiter.set_result(lease)
            if not queue.syncs and not queue.asyncs:
                del self._queues[key]

    def close(self, why: str) -> None:
        """No more leases: every waiting firing gets a ``PetribusError`` saying ``why``."""
        self.closed = True
        for queue in self._queues.values():
            for waiters in (queue.syncs, queue.asyncs):
                while waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(PetribusError(why))
        self._queues.clear()

    @staticmethod
    def _lease(host: H, asynchronous: bool) -> Lease[H]:
        host.load += 1
        if not asynchronous:
            host.exclusive = True
        return Lease(host, exclusive=not asynchronous)


def _load(host: Host) -> int:
    return host.load
