"""KvMirror's load: when its watch says the stored values have all come.

nats.py ends a watch's initial values with ``None``. With nothing received yet it decides that from the
consumer's pending count, which the server may already have lowered for a value still on its way: the
``None`` then comes before the value. A mirror that believed it started empty, and a firing that
looked up a stored secret in it failed with MissingSecret (seen once in CI). These tests drive that
order through the watch seam; the mirror against a real bucket is tested in test_secrets.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from nats.js.kv import KV_DEL

from petribus.kv_mirror import KvMirror


class _Watcher:
    def __init__(self, updates: list) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        for update in updates:
            self.queue.put_nowait(update)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.queue.get()

    async def stop(self) -> None:
        pass


class _Bucket:
    def __init__(self, watcher: _Watcher, stored: int) -> None:
        self.watcher, self.stored, self.status_asked = watcher, stored, 0

    async def watchall(self) -> _Watcher:
        return self.watcher

    async def status(self):
        self.status_asked += 1
        return SimpleNamespace(values=self.stored)


def _entry(key: str, value: bytes, delta: int, operation: str | None = None):
    return SimpleNamespace(key=key, value=value, delta=delta, operation=operation)


def _mirror(bucket: _Bucket) -> KvMirror[str]:
    async def open_bucket():
        return bucket
    return KvMirror(SimpleNamespace(), open_bucket, lambda _, v: v.decode(), what="test")


async def _load(mirror: KvMirror[str]) -> None:
    await mirror._rewatch()  # start() less the reconnect hook, which needs a real connection


async def test_an_early_end_marker_does_not_hide_a_stored_value():
    bucket = _Bucket(_Watcher([None, _entry("TOKEN", b"tok", delta=0)]), stored=1)
    mirror = _mirror(bucket)
    await asyncio.wait_for(_load(mirror), 5)
    assert mirror.items == {"TOKEN": "tok"}
    assert bucket.status_asked == 1  # the early marker was checked against the stream, not believed
    await mirror.close()


async def test_an_empty_bucket_loads_empty_at_its_end_marker():
    bucket = _Bucket(_Watcher([None]), stored=0)
    mirror = _mirror(bucket)
    await asyncio.wait_for(_load(mirror), 5)
    assert mirror.items == {}
    assert bucket.status_asked == 1
    await mirror.close()


async def test_the_last_stored_value_ends_the_load_and_later_ones_are_changes():
    watcher = _Watcher([_entry("A", b"1", delta=2), _entry("B", b"2", delta=1),
                        _entry("A", b"", delta=0, operation=KV_DEL), None])
    bucket = _Bucket(watcher, stored=3)
    mirror = _mirror(bucket)
    await asyncio.wait_for(_load(mirror), 5)
    assert mirror.items == {"B": "2"}
    assert bucket.status_asked == 0  # values came first: the marker needs no check

    changed = asyncio.create_task(mirror.changed())
    await asyncio.sleep(0)
    watcher.queue.put_nowait(_entry("C", b"3", delta=0))
    await asyncio.wait_for(changed, 5)
    assert mirror.items == {"B": "2", "C": "3"}
    await mirror.close()
