"""One session's events over the gateway's WebSocket, resumed across drops with nothing lost or repeated.

``EventStream`` is an async iterator of ``Event``. It connects to ``/bots/{bot}/ws`` (a new session)
or ``/bots/{bot}/ws?session_id=ID&since=SEQ``; when the connection drops (the gateway restarts, NATS
fails over, the network blinks) it connects again with ``since`` set to the ``seq`` of the last event
it handed out, so the gateway's replay starts right after it. The invariant: the ``seq`` of what it
yields strictly increases, and every event of the log after the first ``since`` is yielded once.
It gives up (``ConnectionLost``) after ``RECONNECT_ATTEMPTS`` failed tries in a row, and at once when
the gateway refuses the session (close codes 4404, 4400: ``NotFound``/``Invalid``).

It can also send client messages on the same socket (``send``). Each goes out with a ``request_id``
and is kept in ``unconfirmed`` until an event of the log carries that ``request_id``. When the gateway
answers ``bus_unavailable`` (the log could not take it), or the connection drops and comes back
before the log showed it, it is sent again with the same ``request_id`` (``RESEND_ATTEMPTS`` times at
most): the gateway records a message once per ``request_id``.

The stream reads only when its consumer asks for the next event: there is no task of its own to leak
when a consumer stops early, and ``close()`` (or ``async with``) ends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self
from urllib.parse import urlencode

import websockets

from petribus.client._errors import ClientError, ConnectionLost, Invalid, NotFound, Unauthorized, from_answer
from petribus.client._event import Event, decode

RECONNECT_ATTEMPTS = 10
RESEND_ATTEMPTS = 5  # sends of one message after the first, while the bus is unavailable
RESEND_BACKOFF_S = 0.5  # times the attempt: the gateway asks for about 2 s
BUS_UNAVAILABLE = "bus_unavailable"
CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401  # no valid API key: reconnecting will not help
CLOSE_POLICY = 1008  # a foreign Origin
DELTA = "agent_message_delta"

NoticeKind = Literal["reconnecting", "resending", "not_sent", "unreadable"]
Notice = Callable[[NoticeKind, str], None]
"""Told what the stream does on its own (``reconnecting``, ``resending``, ``not_sent``) or skipped
(``unreadable``: a frame that is not an event), for a person. Without one, these go to the
``petribus.client`` logger."""

log = logging.getLogger("petribus.client")


class EventStream:
    """The events of session ``session_id`` of ``bot`` after ``since`` (all of them when None).

    With ``session_id=None`` the first connection starts a new session; its id is ``session_id`` once
    its ``session_created`` event arrived. ``deltas=True`` also yields the live pieces of an agent's
    reply (``agent_message_delta``, no ``seq``; the whole ``agent_message`` always follows).
    """

    def __init__(self, ws_base: str, bot: str, session_id: str | None = None, *, since: int | None = None,
                 headers: Mapping[str, str] | None = None, deltas: bool = False,
                 on_notice: Notice | None = None,
                 on_close: Callable[[EventStream], None] | None = None) -> None:
        self.ws_base = ws_base.rstrip("/")
        self.bot = bot
        self.session_id = session_id
        self.last_seq = since
        self.reconnects = 0  # connections made after the first: each resumed with since=last_seq
        self.headers = dict(headers or {})
        self.deltas = deltas
        self.on_notice = on_notice
        self._on_close = on_close
        # Messages sent and not yet seen in the log: request_id -> (message, sends after the first).
        self.unconfirmed: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.errors: list[Event] = []  # the error events the gateway sent this stream
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._attempt = 0  # failed connections in a row
        self._closing = False
        self._was_connected = False
        self._last_error: Event | None = None
        self._resends: set[asyncio.Task[None]] = set()

    def url(self) -> str:
        params: dict[str, Any] = {}
        if self.session_id:
            params["session_id"] = self.session_id
            if self.last_seq is not None:
                params["since"] = self.last_seq
        return f"{self.ws_base}/bots/{self.bot}/ws" + (f"?{urlencode(params)}" if params else "")

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def __anext__(self) -> Event:
        while True:
            if self._closing:
                raise StopAsyncIteration
            if self._ws is None:
                await self._connect()
                continue
            try:
                raw = await self._ws.recv()
            except websockets.exceptions.ConnectionClosed as exc:
                await self._dropped(exc.rcvd.code if exc.rcvd else None,
                                    (exc.rcvd.reason if exc.rcvd else "") or str(exc))
                continue
            self._attempt = 0
            event = self._take(raw)
            if event is not None:
                return event

    async def close(self) -> None:
        """Stop reading and sending; messages still unconfirmed are not sent again."""
        self._closing = True
        if self._on_close is not None:
            self._on_close(self)
        for task in list(self._resends):
            task.cancel()
        await asyncio.gather(*self._resends, return_exceptions=True)
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None:
            await ws.close()

    async def _connect(self) -> None:
        try:
            ws = await websockets.connect(self.url(), max_size=None, open_timeout=10,
                                          additional_headers=self.headers or None)
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            await self._dropped(None, str(exc) or type(exc).__name__)
            return
        if self._closing:
            await ws.close()
            return
        self._ws = ws
        self._connected.set()
        if self._was_connected:
            self.reconnects += 1
            # Back after a drop: what was sent may not have been recorded.
            for request_id in list(self.unconfirmed):
                self._resend_later(request_id, "the connection dropped")
        self._was_connected = True

    async def _dropped(self, close: int | None, reason: str) -> None:
        """The connection ended (or could not start): wait and let the next read connect again, or give up."""
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None:
            await ws.close()
        if self._closing:
            return
        if close in (CLOSE_NOT_FOUND, CLOSE_BAD_REQUEST, CLOSE_UNAUTHORIZED, CLOSE_POLICY):
            error = self._last_error
            message = error.value.get("message") if error is not None and isinstance(error.value, dict) else None
            message = message or reason or f"the gateway refused the session (close code {close})"
            code = error.error_code if error is not None else None
            kinds = {CLOSE_NOT_FOUND: NotFound, CLOSE_UNAUTHORIZED: Unauthorized, CLOSE_POLICY: Unauthorized}
            raise kinds.get(close, Invalid)(message, code=code)
        self._attempt += 1
        if self.session_id is None or self._attempt > RECONNECT_ATTEMPTS:
            raise ConnectionLost(f"lost the connection to {self.ws_base}: {reason or close}"
                                 + ("" if self.session_id is None else
                                    f"; resume with session_id={self.session_id} since={self.last_seq}"))
        self._notice("reconnecting", f"{reason or close}; attempt {self._attempt}")
        await asyncio.sleep(min(5.0, 0.2 * 2**self._attempt))

    def _take(self, raw: str | bytes) -> Event | None:
        """The event in ``raw``, or None when it is not for the consumer (a repeat, a delta, a handled error)."""
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._notice("unreadable", f"not an event: {str(raw)[:200]}")
            return None
        event = decode(message)
        if event.type == DELTA:
            return event if self.deltas else None
        if event.session_id and not self.session_id:
            self.session_id = event.session_id
        if event.seq is not None:
            if self.last_seq is not None and event.seq <= self.last_seq:
                return None  # already handed out (a replay overlapping what we had)
            self.last_seq = event.seq
            if event.request_id in self.unconfirmed:
                del self.unconfirmed[event.request_id]  # in the log: sent for good
        if event.type == "error":
            self._last_error = event
            self.errors.append(event)
            if self._on_error(event):
                return None
        return event

    def _on_error(self, event: Event) -> bool:
        """Act on an error about a message this stream sent; True when the consumer need not see it."""
        request_id = event.request_id
        if request_id not in self.unconfirmed:
            return False
        resends = self.unconfirmed[request_id][1]
        if event.error_code == BUS_UNAVAILABLE:
            return self._resend_later(request_id, "the gateway could not record it")
        del self.unconfirmed[request_id]
        # A resent answer that was recorded the first time: nothing went wrong.
        return event.error_code == "already_answered" and resends > 0

    def _resend_later(self, request_id: str, why: str) -> bool:
        payload, resends = self.unconfirmed[request_id]
        if resends >= RESEND_ATTEMPTS:
            del self.unconfirmed[request_id]
            self._notice("not_sent", f"{why} after {resends + 1} tries; send it again: {json.dumps(payload)}")
            return True
        self.unconfirmed[request_id] = (payload, resends + 1)
        self._notice("resending", f"{why}; sending it again (try {resends + 2})")
        task = asyncio.create_task(self._resend(request_id, payload, resends + 1), name="stream-resend")
        self._resends.add(task)
        task.add_done_callback(self._resends.discard)
        return True

    async def _resend(self, request_id: str, payload: dict[str, Any], resends: int) -> None:
        await asyncio.sleep(RESEND_BACKOFF_S * resends)
        if request_id in self.unconfirmed and not self._closing:
            await self._transmit(payload)

    async def send(self, payload: dict[str, Any]) -> str:
        """Send a client message (``{"type", "value"}``) with a ``request_id`` (a new one unless it has
        its own), kept in ``unconfirmed`` until the log shows it; return the ``request_id``.

        Its outcome arrives in the stream: the event it caused (with that ``request_id``), or an
        ``error`` event. Someone must be reading the stream for it to be sent.
        """
        payload = {**payload, "request_id": payload.get("request_id") or uuid.uuid4().hex}
        self.unconfirmed[payload["request_id"]] = (payload, 0)
        await self._transmit(payload)
        return str(payload["request_id"])

    async def _transmit(self, payload: dict[str, Any]) -> None:
        for _ in range(RECONNECT_ATTEMPTS * 2):
            await self._connected.wait()
            ws = self._ws
            if ws is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await ws.send(json.dumps(payload))
                return
            except websockets.exceptions.ConnectionClosed:
                await asyncio.sleep(0.1)  # the reader connects again; send once it has
        raise ConnectionLost("could not send the message: the gateway keeps closing the connection")

    def _notice(self, kind: NoticeKind, text: str) -> None:
        if self.on_notice is not None:
            self.on_notice(kind, text)
        else:
            log.warning("%s: %s", kind, text, extra={"bot": self.bot, "session_id": self.session_id})


def error_of(event: Event) -> ClientError:
    """An ``error`` event as the error a caller would catch."""
    value = event.value if isinstance(event.value, dict) else {}
    return from_answer(None, value.get("code"), str(value.get("message") or value))
