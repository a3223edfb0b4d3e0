"""Bus outages: telling "the bus is not there right now" from an answer, riding it out, and hearing of it.

A nats-server restart or a cluster electing a stream leader looks, from a client, like timeouts, "no
responders" (503) and a few JetStream API errors that mean "not now". None of them is an answer about
the request; all of them go away. ``retry`` repeats an operation through them, with exponential back-off,
for at most the outage budget (``PETRIBUS_BUS_OUTAGE_S``), then raises ``BusUnavailable``. Anything else
(a conflict, a bad request) is an answer and is never retried here.

A timeout is *ambiguous*: the request may have landed and only its answer been lost. ``retry`` tells the
operation so (``maybe_landed``); appends resend with the same ``Nats-Msg-Id`` and, where the server's
de-duplication cannot answer for them (an expected-sequence check fails first), look up whether their
message is there.

``on_reconnect`` / ``on_disconnect`` let a service hear of the connection coming back (to re-issue pull
requests, revalidate caches) without owning the client's callbacks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError

from petribus import logs, nats_direct
from petribus.errors import BusError, BusUnavailable, PetribusError

log = logs.get("petribus.bus")

T = TypeVar("T")

# "wrong last sequence": 10071 (JSStreamWrongLastSequenceErrF, "wrong last sequence: {seq}") from a
# single server; 10164 (JSStreamWrongLastSequenceConstantErr, "wrong last sequence") from a replicated
# stream's leader. nats-server errors.json.
WRONG_LAST_SEQUENCE_CODES = frozenset({10071, 10164})

# JetStream API errors that mean "no stream (or consumer) leader can take this now" (errors.json).
UNAVAILABLE_ERR_CODES = frozenset({
    10008,  # JSClusterNotAvailErr: JetStream system temporarily unavailable
    10009,  # JSClusterNotLeaderErr: JetStream cluster can not handle request
    10118, 10194,  # JSStreamOfflineErr(ReasonErrF): stream is offline
    10119, 10195,  # JSConsumerOfflineErr(ReasonErrF): consumer is offline
    10176,  # JSAtomicPublishIncompleteBatchErr: part of a batch was lost (a restart): send it whole again
})

# JSStreamStoreFailedF with discard=new: "maximum bytes exceeded", "maximum messages per subject exceeded".
# The server answers it with code 503, but it is an answer (the stream is full; docs/limits.md), not an
# outage: waiting out the outage budget would only hold the writer back.
STORE_FULL = 10077

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0  # the longest pause between two tries: a bus that is back is used within this


def is_wrong_last_sequence(err_code: int | None, description: str | None = None) -> bool:
    """Whether a JetStream error is the expected-last-sequence conflict, by any of its codes or its text."""
    return err_code in WRONG_LAST_SEQUENCE_CODES or "wrong last sequence" in (description or "").lower()


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the bus is unavailable right now (worth retrying), not an answer."""
    if isinstance(exc, APIError):
        return (exc.code == 503 and exc.err_code != STORE_FULL) or exc.err_code in UNAVAILABLE_ERR_CODES
    return isinstance(exc, (
        TimeoutError,  # asyncio's, nats-py's and our BusTimeout
        nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
        nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
    ))


def maybe_landed(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` may still have reached the stream."""
    return isinstance(exc, (TimeoutError, nats.errors.ConnectionReconnectingError,
                            nats.errors.StaleConnectionError))


def default_budget() -> float:
    """``PETRIBUS_BUS_OUTAGE_S``, else the setting's default (one source of truth: ``Settings``)."""
    from petribus.settings import Settings  # settings imports nothing of ours; late to keep this light

    raw = os.environ.get("PETRIBUS_BUS_OUTAGE_S")
    return float(raw) if raw else float(Settings.model_fields["bus_outage_s"].default)


class Outage:
    """One warning when the bus goes away and one, with its length, when it is back."""

    def __init__(self) -> None:
        self.since: float | None = None

    def begin(self, what: str, exc: BaseException, budget_s: float) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("bus unavailable, retrying", operation=what, error=repr(exc), budget_s=budget_s)

    def end(self) -> None:
        if self.since is not None:
            lasted = time.monotonic() - self.since
            self.since = None
            log.warning("bus available again", outage_s=round(lasted, 3))


async def retry(nc: NATS, what: str, attempt: Callable[[bool], Awaitable[T]], *, budget_s: float,
                outage: Outage | None = None, landed: bool = False) -> T:
    """``await attempt(maybe_landed)`` until it returns, while its failures mean "bus unavailable".

    ``maybe_landed`` is true once an earlier try may have reached the stream (it timed out). After
    ``budget_s`` seconds of failures, ``BusUnavailable``; a failure that is an answer is raised at once
    (a nats error as a ``BusError``).
    """
    loop = asyncio.get_running_loop()
    first_failure: float | None = None
    delay = RETRY_FIRST_S
    while True:
        try:
            result = await attempt(landed)
        except Exception as exc:
            if isinstance(exc, BusUnavailable) or nc.is_closed or not is_unavailable(exc):
                if isinstance(exc, (PetribusError, asyncio.CancelledError)) or not isinstance(exc, nats.errors.Error):
                    raise
                raise BusError(f"{what} failed: {exc}") from exc
            now = loop.time()
            first_failure = now if first_failure is None else first_failure
            landed = landed or maybe_landed(exc)
            if outage is not None:
                outage.begin(what, exc, budget_s)
            waited = now - first_failure
            if waited >= budget_s:
                raise BusUnavailable(
                    f"{what}: the bus has been unavailable for {waited:.1f}s (last error: {exc!r}). "
                    + ("It may or may not have landed; retrying with the same Msg-Id is safe. " if landed else
                       "Nothing was written. ")
                    + "Check that nats-server is running and reachable (PETRIBUS_NATS_URL) and, on a cluster, "
                    "that a majority of nodes is up so the stream has a leader; PETRIBUS_BUS_OUTAGE_S "
                    f"({budget_s:g}s) sets how long to wait."
                ) from exc
            await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), budget_s - waited))
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if outage is not None:
            outage.end()
        return result


class Publisher:
    """JetStream publishes to any stream (work items, timers, events) that ride out a bus outage: every
    try carries the same ``Nats-Msg-Id``, so a resend after a lost answer lands once (within the stream's
    duplicate window). ``bus.EventLog`` appends through one; the scheduler's work and timers can too.
    """

    def __init__(self, nc: NATS, js: JetStreamContext | None = None, *, outage_s: float | None = None,
                 outage: Outage | None = None) -> None:
        self.nc = nc
        self.js = js or nc.jetstream()
        self.outage_s = default_budget() if outage_s is None else outage_s
        self.outage = outage or Outage()
        self._deadlines: list[tuple[float, int, _Send]] = []  # publish_soon's sends, earliest first
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._resends: set[asyncio.Task[PubAck]] = set()
        self._reply_prefix = ""  # "<inbox>.": publish_soon's answers come to <inbox>.<token>
        self._ask_prefix = ""  # ask's, to another inbox
        self._listen_lock = asyncio.Lock()
        self._tokens = itertools.count()
        self._waiting: dict[str, _Send] = {}  # token -> a send whose answer has not come

    async def publish(self, subject: str, payload: bytes, *, msg_id: str, timeout: float = 5.0,
                      landed: bool = False, headers: dict[str, str] | None = None) -> PubAck:
        """Publish and wait for JetStream's ack (``duplicate`` set if the Msg-Id had landed before).
        ``headers``: more to send (a ``traceparent``)."""
        headers = with_msg_id(headers, msg_id)

        async def attempt(_: bool) -> PubAck:
            try:
                return await self.js.publish(subject, payload, headers=dict(headers), timeout=timeout)
            except APIError as exc:
                if is_unavailable(exc):
                    raise
                raise BusError(f"publish to {subject} failed: {exc}") from exc

        return await retry(self.nc, f"publish to {subject}", attempt, budget_s=self.outage_s, outage=self.outage,
                           landed=landed)

    async def publish_soon(self, subject: str, payload: bytes, *, msg_id: str, timeout: float = 5.0,
                           headers: dict[str, str] | None = None) -> asyncio.Future[PubAck]:
        """Send now; a future of the ack, as ``js.publish_async`` gives, but one that always settles:
        an answer lost with its server is waited for at most ``timeout``, then the message is resent
        (same Msg-Id) through the outage. Messages sent on one connection land in the order sent,
        unless the bus fails under them: a resent one lands after whatever got through meanwhile.

        Cheap per message (the scheduler and the executor send two or three per firing): the answer
        comes to one reply subscription of this publisher, named by a counter, and settles the future
        from a callback; its deadline is an entry in one heap watched by one timer. nats-py's
        ``publish_async`` cost twice the CPU (a random token and a unique id per message, a semaphore,
        the ack parsed into a dataclass field by field), and a task and a ``wait_for`` per message
        before that were a tenth of the scheduler's CPU.
        """
        loop = asyncio.get_running_loop()
        out: asyncio.Future[PubAck] = loop.create_future()
        send = _Send(out, "", subject, payload, msg_id, timeout, headers)
        try:
            prefix = self._reply_prefix or await self._listen()
            send.token = str(next(self._tokens))
            self._waiting[send.token] = send
            await self.nc.publish(subject, payload, reply=prefix + send.token,
                                  headers=with_msg_id(headers, msg_id))
        except Exception as exc:
            self._waiting.pop(send.token, None)
            if self.nc.is_closed or not is_unavailable(exc):
                raise BusError(f"publish to {subject} failed: {exc}") from exc
            self._resend(out, subject, payload, msg_id, timeout, headers)
            return out
        self._watch(loop, send)
        return out

    async def ask(self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float) -> PubAck:
        """Publish once and wait for the answer, as ``js.publish`` does (``APIError`` for a refusal,
        ``NoStreamResponseError`` when no stream answers, ``nats.errors.TimeoutError`` after
        ``timeout``), never resending: for a caller with its own retry (a checked append, whose retry
        must know that an earlier try may have landed). Through this publisher's reply subscription:
        no request inbox, random token or ``wait_for`` per message."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[PubAck] = loop.create_future()
        send = _Send(out, str(next(self._tokens)), subject, b"", None, timeout, headers)
        # Answers of its own: a waiting caller's answer is not queued behind those of many sends.
        prefix = self._ask_prefix or await self._listen(asking=True)
        self._waiting[send.token] = send
        late = loop.call_later(timeout, _time_out, out)
        try:
            await self.nc.publish(subject, payload, reply=prefix + send.token, headers=headers)
            return await out
        finally:
            late.cancel()
            self._waiting.pop(send.token, None)

    async def _listen(self, *, asking: bool = False) -> str:
        """Subscribe to this publisher's answers, of sends or of asks (once each; nats-py subscribes
        again after a reconnect). A subscription's messages are handled in turn by one task."""
        async with self._listen_lock:
            if not (self._ask_prefix if asking else self._reply_prefix):
                prefix = self.nc.new_inbox() + "."
                await nats_direct.subscribe(self.nc, prefix + "*", self._on_answer)
                if asking:
                    self._ask_prefix = prefix
                else:
                    self._reply_prefix = prefix
        return self._ask_prefix if asking else self._reply_prefix

    def _on_answer(self, msg: Msg) -> None:
        send = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if send is None or send.out.done():
            return  # resent already (its time ran out), or settled
        if msg.headers and msg.headers.get("Status") == "503":
            self._answered(send, nats.js.errors.NoStreamResponseError())  # no stream leader (yet)
            return
        try:
            answer = json.loads(msg.data)
            error = answer.get("error")
            if error:
                try:  # nats-py's from_error raises the right subclass (ServiceUnavailableError, ...)
                    APIError.from_error(error)
                except APIError as refused:
                    self._answered(send, refused)
                return
            ack = PubAck(stream=answer["stream"], seq=answer["seq"], domain=answer.get("domain"),
                         duplicate=answer.get("duplicate"))
        except (ValueError, KeyError, TypeError) as exc:
            self._answered(send, BusError(f"publish to {send.subject}: unreadable answer {msg.data[:200]!r}"))
            log.error("unreadable publish answer", subject=send.subject, error=repr(exc))
            return
        self._answered(send, None, ack)

    def _answered(self, send: _Send, exc: BaseException | None, ack: PubAck | None = None) -> None:
        out = send.out
        if out.done():
            return
        if send.msg_id is None:  # ``ask``: what the server said, as it said it; its caller decides
            if exc is None:
                out.set_result(ack)  # type: ignore[arg-type]
            else:
                out.set_exception(exc)
            return
        if exc is None:
            send.payload = b""  # answered: the heap need not hold the message until its deadline
            out.set_result(ack)  # type: ignore[arg-type]
        elif is_unavailable(exc):
            self._resend(out, send.subject, send.payload, send.msg_id, send.timeout, send.headers)
        elif isinstance(exc, nats.errors.Error):
            failed = BusError(f"publish to {send.subject} failed: {exc}")
            failed.__cause__ = exc  # what the server said (an APIError's err_code), for callers to tell
            out.set_exception(failed)
        else:
            out.set_exception(exc)

    def _watch(self, loop: asyncio.AbstractEventLoop, send: _Send) -> None:
        """Bounded: an answer lost with its server never comes."""
        deadline = loop.time() + send.timeout
        heapq.heappush(self._deadlines, (deadline, next(self._order), send))
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, send = heapq.heappop(self._deadlines)
            if not send.out.done():
                self._waiting.pop(send.token, None)  # a late answer is not waited for: it may have landed
                self._resend(send.out, send.subject, send.payload, send.msg_id, send.timeout, send.headers)
        if self._deadlines:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)

    def _resend(self, out: asyncio.Future[PubAck], subject: str, payload: bytes, msg_id: str,
                timeout: float, headers: dict[str, str] | None = None) -> None:
        """It may have landed (a timeout): the same Msg-Id makes the resend land once."""
        task = asyncio.ensure_future(self.publish(subject, payload, msg_id=msg_id, timeout=timeout,
                                                  landed=True, headers=headers))
        self._resends.add(task)

        def settle(task: asyncio.Task[PubAck]) -> None:
            self._resends.discard(task)
            if out.done():
                return
            if task.cancelled():
                out.cancel()
            elif (exc := task.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(task.result())

        task.add_done_callback(settle)


def with_msg_id(headers: dict[str, str] | None, msg_id: str) -> dict[str, str]:
    """``headers`` (if any) with ``Nats-Msg-Id`` set: JetStream drops a repeat within its window."""
    return {"Nats-Msg-Id": msg_id} if headers is None else {**headers, "Nats-Msg-Id": msg_id}


def _time_out(answer: asyncio.Future[PubAck]) -> None:
    if not answer.done():
        answer.set_exception(nats.errors.TimeoutError())


class _Send:
    """A message ``publish_soon`` (or ``ask``: no ``msg_id``) sent and has not heard back about yet."""

    # payload: dropped once answered
    __slots__ = ("headers", "msg_id", "out", "payload", "subject", "timeout", "token")

    def __init__(self, out: asyncio.Future[PubAck], token: str, subject: str, payload: bytes,
                 msg_id: str | None, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.headers = headers
        self.out = out
        self.token = token  # the last token of its answer's subject
        self.subject = subject
        self.payload = payload
        self.msg_id = msg_id
        self.timeout = timeout


Hook = Callable[[], Awaitable[None]]


class ConnectionHooks:
    """Callbacks run (as tasks, so a slow one never holds up the client) when a connection drops or is
    re-established."""

    def __init__(self) -> None:
        self.reconnected: list[Hook] = []
        self.disconnected: list[Hook] = []
        self.down_since: float | None = None  # while the connection is lost: since when
        self._tasks: set[asyncio.Task[None]] = set()

    async def fire_reconnected(self) -> None:
        if self.down_since is not None:
            log.warning("nats connection back", down_s=round(time.monotonic() - self.down_since, 3))
            self.down_since = None
        self._fire(self.reconnected, "reconnected")

    async def fire_disconnected(self) -> None:
        self.down_since = time.monotonic()
        self._fire(self.disconnected, "disconnected")

    def _fire(self, hooks: list[Hook], what: str) -> None:
        for hook in list(hooks):
            task = asyncio.ensure_future(self._run(hook, what))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(hook: Hook, what: str) -> None:
        try:
            await hook()
        except Exception as exc:  # one hook's failure is its owner's; the others still run
            log.error(f"{what} hook failed", hook=getattr(hook, "__qualname__", repr(hook)), error=repr(exc),
                      exc_info=exc)


_hooks: weakref.WeakKeyDictionary[NATS, ConnectionHooks] = weakref.WeakKeyDictionary()


def hooks_for(nc: NATS) -> ConnectionHooks:
    """The hooks of ``nc``. ``bus.connect`` wires them at connect; a client made elsewhere gets them
    chained in front of its own callbacks (nats-py keeps those in private attributes)."""
    found = _hooks.get(nc)
    if found is None:
        found = _hooks[nc] = ConnectionHooks()
        for attr, fire in (("_reconnected_cb", found.fire_reconnected), ("_disconnected_cb", found.fire_disconnected)):
            own = getattr(nc, attr, None)

            async def chained(own: Hook | None = own, fire: Hook = fire) -> None:
                await fire()
                if own is not None:
                    await own()

            setattr(nc, attr, chained)
    return found


def attach(nc: NATS, hooks: ConnectionHooks) -> None:
    """Register hooks already wired into ``nc``'s callbacks at connect."""
    _hooks[nc] = hooks


def on_reconnect(nc: NATS, callback: Hook) -> Callable[[], None]:
    """Run ``await callback()`` each time ``nc`` reconnects (subscriptions are back by then). Returns a
    function that unregisters it."""
    return _register(hooks_for(nc).reconnected, callback)


def on_disconnect(nc: NATS, callback: Hook) -> Callable[[], None]:
    """Run ``await callback()`` each time ``nc`` loses its server. Returns a function that unregisters it."""
    return _register(hooks_for(nc).disconnected, callback)


def _register(hooks: list[Hook], callback: Hook) -> Callable[[], None]:
    hooks.append(callback)

    def unregister() -> None:
        if callback in hooks:
            hooks.remove(callback)

    return unregister
