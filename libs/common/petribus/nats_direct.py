"""Subscriptions whose messages are handled as nats-py reads them: no queue, no task, no loop turn.

nats-py hands every message of a subscription with a callback to a queue, which a task of its own
empties, awaiting the callback for each: a ``put_nowait``, a future woken, a turn of the event loop and
a task step per message. The answers to appends, the replies to reads, the messages a pull consumer is
sent and the claims' republish are all handled by a plain function that files the message away (a
future set, a deque appended to) and never waits: ``subscribe`` calls it from the client's reading
coroutine as each message is parsed (``install`` patches ``Client._process_msg`` for such
subscriptions only; every other goes the usual way). A message that arrives before the subscription is
marked goes the usual way too, to the same function, so none is lost.

Handlers run inside the client's read loop: one that blocks stalls the connection, and one that raises
is reported to the connection's error callback, as nats-py does for callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

DIRECT = "_petribus_direct"  # the handler, on a Subscription

original = getattr(Client, "_process_msg", None)


async def subscribe(nc: Client, subject: str, handler: Callable[[Msg], None], *,
                    queue: str = "") -> Subscription:
    """``nc.subscribe`` with ``handler`` called for each message as it is read (see the module)."""

    async def fallback(msg: Msg) -> None:  # for what is read before the mark below is set
        handler(msg)

    sub = await nc.subscribe(subject, queue=queue, cb=fallback)
    setattr(sub, DIRECT, handler)
    return sub


async def _process_msg(self: Client, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: bytes) -> None:
    sub = self._subs.get(sid)
    handler = getattr(sub, DIRECT, None)
    if handler is None:
        return await original(self, sid, subject, reply, data, headers)  # type: ignore[misc]
    self.stats["in_msgs"] += 1
    self.stats["in_bytes"] += len(data)
    sub._received += 1  # type: ignore[union-attr]
    msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
    try:
        handler(msg)
    except Exception as exc:  # noqa: BLE001 -- as nats-py treats a callback's error
        await self._error_cb(exc)


def install() -> None:
    """Route marked subscriptions past the queue. Nothing is replaced if nats-py changes the method."""
    if original is not None and not getattr(Client._process_msg, "__petribus__", False):
        _process_msg.__petribus__ = True  # type: ignore[attr-defined]
        Client._process_msg = _process_msg  # type: ignore[method-assign]


def handled_directly(sub: Any) -> bool:
    return getattr(sub, DIRECT, None) is not None
