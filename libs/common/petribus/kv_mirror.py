"""A KV bucket mirrored in memory by a watch: look-ups are dictionary reads, never requests.

The secrets store, the API keys and the deleted sessions' tombstones are each one of these. ``start``
loads what the bucket holds and follows it; after each reconnect to NATS a fresh watch loads the bucket
again and, once loaded, replaces the old one (a watch the server dropped while the connection was down,
in a restart, a fail-over or an outage longer than its inactivity threshold, would go quiet and keep
stale values: a revoked key alive, a deleted secret usable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from petribus import logs
from petribus.errors import BusError
from petribus.outage import default_budget, on_reconnect, retry

T = TypeVar("T")
log = logs.get("petribus.kv_mirror")


class KvMirror(Generic[T]):
    """``items``: key -> ``parse(key, value)`` for every live key of the bucket ``open_bucket`` gives
    (a key whose value ``parse`` refuses with None is left out). ``what`` names it in logs and errors."""

    def __init__(self, nc: NATS, open_bucket: Callable[[], Awaitable[KeyValue]],
                 parse: Callable[[str, bytes], T | None], *, what: str) -> None:
        self._nc = nc
        self._open_bucket = open_bucket
        self._parse = parse
        self.what = what
        self.items: dict[str, T] = {}
        self._watch: tuple[KeyValue.KeyWatcher, asyncio.Task[None]] | None = None
        self._changed = asyncio.Condition()
        self._unhook: Callable[[], None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Load what is stored and keep it up to date. Returns once it is known."""
        await self._rewatch()
        self._unhook = on_reconnect(self._nc, self._renew)

    async def _renew(self) -> None:
        # Right after a reconnect the bucket's stream may still be electing a leader: wait for it, within
        # the bus's outage budget (then the hook's failure is logged and the old watch stays).
        await retry(self._nc, f"renewing the {self.what} watch", lambda _: self._rewatch(),
                    budget_s=default_budget())

    async def _rewatch(self) -> None:
        """A new watch from what is stored now; once it has loaded, it replaces the one before."""
        if self._closed:
            return
        kv = await self._open_bucket()
        watcher = await kv.watchall()
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._follow(kv, watcher, loaded), name=f"{self.what}-watch")
        await asyncio.wait({loaded, task}, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():  # the watch ended before it loaded: say why
            error = None if task.cancelled() else task.exception()
            await _stop(watcher, task)
            raise error or BusError(f"the {self.what} watch ended before it had loaded the bucket")
        if self._closed:  # closed while this watch was loading
            await _stop(watcher, task)
            return
        old, self._watch = self._watch, (watcher, task)
        if old is not None:
            await _stop(*old)
            log.info("watch renewed", what=self.what, items=len(self.items))
            async with self._changed:  # a change made while the connection was down counts now
                self._changed.notify_all()

    async def _follow(self, kv: KeyValue, watcher: KeyValue.KeyWatcher, loaded: asyncio.Future[None]) -> None:
        items: dict[str, T] = {}

        def apply(entry: KeyValue.Entry) -> str | None:
            value = None if entry.operation in (KV_DEL, KV_PURGE) else self._parse(entry.key, entry.value or b"")
            if value is None:
                items.pop(entry.key, None)
            else:
                items[entry.key] = value
            return None if value is None else entry.key

        await load_stored(kv, watcher, apply)
        self.items = items  # what was stored when the watch began is all here: it is the truth now
        loaded.set_result(None)
        async for entry in watcher:
            if entry is not None:  # (the end-of-load marker, when it comes after the values)
                kept = apply(entry)
                log.info("changed", what=self.what, key=entry.key, deleted=kept is None)
                async with self._changed:
                    self._changed.notify_all()

    async def changed(self) -> None:
        """Wait for the next change the watch delivers (for tests and tools; look-ups never wait)."""
        async with self._changed:
            await self._changed.wait()

    async def close(self) -> None:
        self._closed = True
        if self._unhook is not None:
            self._unhook()
        if self._watch is not None:
            await _stop(*self._watch)
            self._watch = None
        self.items = {}


async def load_stored(kv: KeyValue, watcher: KeyValue.KeyWatcher, apply: Callable[[KeyValue.Entry], object],
                      *, timeout_s: float | None = None) -> None:
    """Give ``apply`` each entry (values, deletes, purges) that ``kv`` held when ``watcher`` began, and
    return once they have all come; later entries stay in ``watcher`` for the caller.

    nats.py ends the stored entries with ``None``. With nothing received yet it decides that from the
    consumer's pending count, which the server may already have lowered for an entry still on its way,
    so that marker can come first: an empty start is believed only when the bucket's stream holds
    nothing. Otherwise the last stored entry (``delta`` 0: nothing more pending) ends the load.
    ``timeout_s``: the longest wait for the next entry (TimeoutError); None waits as long as it takes.
    """
    received = False
    while True:
        try:
            entry = await asyncio.wait_for(anext(watcher), timeout_s)
        except StopAsyncIteration:
            raise BusError(f"the watch of bucket {kv._name!r} stopped before its stored entries had come") from None
        if entry is None:
            if not received and (await kv.status()).values == 0:
                return
            continue
        received = True
        apply(entry)
        if entry.delta == 0:
            return


async def _stop(watcher: KeyValue.KeyWatcher, task: asyncio.Task[None]) -> None:
    with contextlib.suppress(Exception):  # the connection may be closing already
        await watcher.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
