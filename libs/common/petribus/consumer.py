"""A continuous pull consumer with credits: messages flow as soon as they exist, never more than asked.

nats-py's ``fetch(batch=n)`` waits on a lingering pull until the whole batch or its timeout, which adds
the timeout to the latency of a lone message. This keeps pull requests outstanding instead (as the Go
client's ``Consume()`` does): each request asks for some messages; delivered messages use up credits;
when credits run low a new request is sent. ``credits`` bounds what is in our hands at once, so an
executor asks for exactly as many firings as it has free workers.

Pull requests live on the server that holds the consumer's leader, so a nats-server restart or a
consumer leader fail-over ends them silently. The consumer notices (the connection's reconnect, a 503,
a 409 "Leadership Change" / "Consumer Deleted", or heartbeats that stop), checks that its durable still
exists (re-creating it through the owner's ``ensure`` callback if not) and asks again: work keeps
flowing with no process restart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from petribus import logs, nats_direct
from petribus.outage import RETRY_MAX_S, on_reconnect

log = logs.get("petribus.consumer")

HEARTBEAT_S = 5.0
# A pull request lives this long. It bounds how long a request that a fail-over stranded on a server
# that still heartbeats but no longer delivers (measured: a scheduler stalled until its 30 s requests
# expired) can hold a consumer up; a fresh request every 10 s costs nothing worth counting.
EXPIRES_S = 10.0
CONSUMER_NOT_FOUND = 10014  # JSConsumerNotFoundErr
STREAM_NOT_FOUND = 10059  # JSStreamNotFoundErr


class PullConsumer:
    """Keeps pull requests outstanding on the durable ``durable`` of ``stream``.

    ``ensure``, if given, re-creates the durable consumer (with its owner's config); it is awaited when
    the server says the consumer does not exist, e.g. after a server lost its store or an operator
    deleted it.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, max_inflight: int = 256,
                 expires_s: float = EXPIRES_S, ensure: Callable[[], Awaitable[None]] | None = None,
                 handle: Callable[[Msg], None] | None = None) -> None:
        self.nc = nc
        # Each delivered message is given to ``handle`` as the connection reads it, instead of being kept
        # for ``next_batch``: a caller that starts a task per message saves a wake-up and a loop turn.
        self.handle = handle
        self.stream = stream
        self.durable = durable
        self.max_inflight = max_inflight
        self.expires_s = expires_s
        self.ensure = ensure
        self._recovering: asyncio.Task[None] | None = None
        self._unhook: Callable[[], None] | None = None
        self._queue: deque[Msg] = deque()
        self._ready = asyncio.Event()
        self._requested = 0  # messages asked for and not yet delivered or expired
        self._held = 0  # delivered and not yet released by the caller
        self._sub: Subscription | None = None
        self._inbox = ""
        self._last_seen = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False
        self._asking: set[asyncio.Task[None]] = set()  # pull requests being sent

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await nats_direct.subscribe(self.nc, self._inbox, self._on_msg)
        await self._top_up()
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull-watchdog:{self.durable}")
        self._unhook = on_reconnect(self.nc, self._on_reconnect)

    async def stop(self) -> None:
        self._stopped = True
        if self._unhook:
            self._unhook()
        for task in (self._watchdog, self._recovering):
            if task:
                task.cancel()
        if self._sub is not None:
            try:
                # Not a bare unsubscribe: a message the server sent before it saw that would be dropped
                # here and stranded until ack_wait. Draining lets it arrive (and be given back below).
                await self._sub.drain()
            except Exception:  # the connection may already be closed
                pass
        # Delivered to us but never handed out: give them back now rather than after ack_wait.
        while self._queue:
            msg = self._queue.popleft()
            try:
                await msg.nak()
            except Exception:  # disconnected: JetStream redelivers them after ack_wait anyway
                pass

    def release(self, n: int = 1) -> None:
        """The caller is done with ``n`` messages (acked or nakked): room for more."""
        self._held = max(0, self._held - n)
        if self._wants_more():
            self._ask_soon()

    def _ask_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._top_up())
        self._asking.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._asking.discard)

    def _room(self) -> int:
        # ``_held`` counts the messages still queued here too: they were delivered, not yet released.
        return self.max_inflight - self._held - self._requested

    def _wants_more(self) -> bool:
        if self._stopped:
            return False  # nobody reads the inbox any more: asking would strand messages until ack_wait
        # Ask in chunks (at least a quarter of the window) so a busy consumer sends few requests.
        room = self._room()
        return room > 0 and (room >= max(1, self.max_inflight // 4) or self._requested == 0)

    async def next_batch(self, max_n: int) -> list[Msg]:
        """Wait for at least one message, then return up to ``max_n`` already here (no extra wait)."""
        if self.handle is not None:
            raise RuntimeError(f"consumer {self.durable!r} hands its messages to its handler: "
                               "nothing waits here")
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        out = []
        while self._queue and len(out) < max_n:
            out.append(self._queue.popleft())
        return out

    async def _top_up(self) -> None:
        if not self._wants_more():
            return
        room = self._room()
        self._requested += room
        req = {"batch": room, "expires": int(self.expires_s * 1e9), "idle_heartbeat": int(HEARTBEAT_S * 1e9)}
        try:
            await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                                  json.dumps(req).encode(), reply=self._inbox)
        except Exception as exc:  # disconnected: the watchdog asks again after reconnect
            self._requested -= room
            log.warning("pull request failed", durable=self.durable, error=repr(exc))

    def _on_msg(self, msg: Msg) -> None:
        """Each message as the connection reads it (``nats_direct``): filed, never waited on here."""
        self._last_seen = time.monotonic()
        if msg.reply and msg.reply.startswith("$JS.ACK"):
            self._requested = max(0, self._requested - 1)
            self._held += 1
            if self.handle is not None:
                self.handle(msg)
            else:
                self._queue.append(msg)
                self._ready.set()
            if self._requested == 0 and self._room() > 0:
                # The request is used up and there is room left (it asked for less than the window, or
                # some of its credits came back meanwhile): ask now, not when the next message is released,
                # which may be seconds away while every held message waits on something slow.
                self._ask_soon()
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":
            return  # idle heartbeat
        if status == "503":
            # No responders: nobody holds the consumer now (a server restarting, a leader being elected,
            # the consumer gone). Every request we have out went nowhere.
            self._recover("no responders")
            return
        description = headers.get("Description", "")
        if status in ("404", "408", "409"):
            # The request ended (expired, or the server dropped it): give back its unused credits.
            left = int(headers.get("Nats-Pending-Messages", "0"))
            self._requested = max(0, self._requested - left) if left else 0
            if status == "409" and description.lower() in ("leadership change", "consumer deleted"):
                self._recover(description)
            else:
                self._ask_soon()

    async def _on_reconnect(self) -> None:
        # Requests held by a server that restarted are gone with it; after a fail-over they may live on.
        # Asking again is safe either way: at worst more is delivered than the window for a while.
        self._recover("reconnected")

    def _recover(self, reason: str) -> None:
        """Make sure the durable exists (``ensure`` if not), then ask again for the whole window."""
        if self._stopped or (self._recovering and not self._recovering.done()):
            return
        log.info("re-issuing pull requests", durable=self.durable, reason=reason)
        self._recovering = asyncio.get_running_loop().create_task(self._recover_loop(),
                                                                  name=f"pull-recover:{self.durable}")

    async def _recover_loop(self) -> None:
        delay = 0.05
        while not self._stopped:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            if not self.nc.is_connected:
                continue
            state = await self._consumer_state()
            if state == "missing":
                if self.ensure is None:
                    log.error("the durable consumer does not exist and nothing re-creates it; waiting for it",
                              stream=self.stream, durable=self.durable)
                    continue
                try:
                    await self.ensure()
                except Exception as exc:  # the bus may still be settling: try again after a pause
                    log.warning("re-creating the durable consumer failed", durable=self.durable, error=repr(exc))
                    continue
                log.warning("re-created the durable consumer", stream=self.stream, durable=self.durable)
            elif state != "ok":
                continue
            self._requested = 0
            self._last_seen = time.monotonic()
            await self._top_up()
            return

    async def _consumer_state(self) -> str:
        """'ok', 'missing' (the server says so), or 'unknown' (no clear answer: the bus is settling)."""
        try:
            reply = await self.nc.request(f"$JS.API.CONSUMER.INFO.{self.stream}.{self.durable}", b"", timeout=2.0)
            error = json.loads(reply.data).get("error")
        except Exception as exc:  # no responders, timeout, a reconnect: not an answer
            log.debug("consumer info failed", durable=self.durable, error=repr(exc))
            return "unknown"
        if not error:
            return "ok"
        if error.get("err_code") in (CONSUMER_NOT_FOUND, STREAM_NOT_FOUND):
            return "missing"
        return "unknown"

    async def _watch(self) -> None:
        # Not a poll of the work: it only notices pull requests that went silent (no heartbeats), e.g.
        # after a reconnect or a fail-over dropped them without a word, and asks again.
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            silent = time.monotonic() - self._last_seen > 3 * HEARTBEAT_S
            if silent and self.nc.is_connected and (self._requested > 0 or self._wants_more()):
                self._last_seen = time.monotonic()
                self._recover("no heartbeats")
