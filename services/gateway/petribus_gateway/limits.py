"""Bounded input and fair use at the gateway's door: an ASGI middleware around the whole app (docs/limits.md).

Everything here answers before the request reaches a route (but for the new sessions that a route admits
through ``GatewayContext.admit_session``, below), and never drops a connection:

- **Bodies.** A body (POST/PUT/PATCH outside the file routes, which have ``PETRIBUS_MAX_FILE_BYTES``)
  over ``PETRIBUS_MAX_BODY_BYTES`` is refused with 413 ``body_too_large``: at once when its
  ``Content-Length`` says so, else as soon as the bytes read pass the limit (chunked bodies). A body that
  is not UTF-8, or nests deeper than ``inputs.MAX_DEPTH`` or has over ``inputs.MAX_MEMBERS`` members,
  gets 422 before any parser sees it, whatever its ``Content-Type`` says: every such route takes JSON.
- **Rates** (token buckets: an average rate and a burst). Per API key (per client address without one):
  ``PETRIBUS_KEY_REQUEST_RATE`` requests and WebSocket messages per second, else 429 ``rate_limited`` with
  ``Retry-After``. One bucket per key, however the key came: a WebSocket's messages spend its key's bucket
  from the moment ``ws.py`` knows the key, from the header at once, from a browser's first message as soon
  as that message is read (``bill_socket``). Per WebSocket connection: ``PETRIBUS_WS_MESSAGE_RATE``
  messages per second; an excess message is not processed and its sender gets an ``error`` event
  (``rate_limited``); the connection stays open. The middleware owns the socket's send side for that (one
  lock), so the error never interleaves with the gateway's own frames.
- **New sessions** (``POST /bots/{bot}/sessions``, ``POST .../sessions/{id}/fork``, a WebSocket without
  ``session_id``): per client address ``PETRIBUS_SESSION_CREATE_RATE``; per owner (the key's owner;
  without a key, the client address) ``PETRIBUS_MAX_SESSIONS_PER_OWNER`` sessions at once (429
  ``session_quota``); none once PB_EVENTS holds ``PETRIBUS_NEW_SESSIONS_MAX_FILL`` of its ``max_bytes``
  (507 ``storage_full``), so the room left is for the sessions already live. This middleware admits
  ``POST /bots/{bot}/sessions`` itself. The others are admitted through ``GatewayContext.admit_session``
  where the answer is known: a WebSocket by ``ws.py`` once its caller is known (a browser's key comes in
  its first message), so its session is charged to the key's owner, and refused with the error and close
  4429 (quota, rate) or 4507 (storage); a fork by its route, after it has looked for the fork a keyed
  retry names, so that a retry of a fork that landed is answered as the first time and not charged again
  (a fresh key names a fork that does not exist yet, and is charged).

Buckets live in this process: with several gateways each enforces its own share. Session counts per owner
are the log's (its subjects and each session's first event), recounted at most every ``COUNT_S`` and
counted up locally in between, so several gateways may together let an owner go a little past the quota.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import OrderedDict
from typing import Any

from fastapi.responses import JSONResponse
from nats.js.errors import NotFoundError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from petribus import logs, subjects
from petribus.errors import InvalidInput
from petribus.events import ErrorEvent, decode, to_client
from petribus_gateway import inputs, reasons
from petribus_gateway.auth import Caller, Unauthorized, bearer

log = logs.get("petribus.gateway")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NEW_SESSION = re.compile(r"^/bots/([^/]+)/sessions/?$")
NEW_SOCKET = re.compile(r"^/bots/([^/]+)/ws/?$")
FILE_ROUTE = re.compile(r"/files(/|$)")
CLOSE_LIMITED = 4429
CLOSE_STORAGE = 4507
BUCKETS = 100_000  # keys, addresses and owners remembered (least recently used forgotten)
COUNT_S = 10.0  # how long a count of sessions per owner is trusted (plus what this process created since)
STORAGE_S = 1.0  # how long PB_EVENTS' usage is trusted
BILLED = "petribus.limits.billed"  # scope key of a WebSocket's ``Billed``


class Refused(Exception):
    """A request refused here: HTTP status, code, message, and Retry-After when waiting helps."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 close: int = CLOSE_LIMITED) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after, self.close = status, code, message, retry_after, close


class Billed:
    """Whose request budget a WebSocket's messages spend: the caller's key, or its address while no key is
    known (a browser's first message, which brings it, is the address's); None for a header key that is
    not valid (the connection's own rate only: ``ws.py`` closes it with 4401). Held in the connection's
    scope, so that ``ws.py`` can name the key that came in a message (``bill_socket``)."""

    __slots__ = ("caller",)

    def __init__(self, caller: Caller | None) -> None:
        self.caller = caller


def bill_socket(scope: Scope, caller: Caller) -> None:
    """Charge the WebSocket's next messages to ``caller``'s key: the same bucket as that key's REST calls.
    ``ws.py`` calls it once it knows the key, whether from the header or from a message."""
    billed = scope.get(BILLED)
    if isinstance(billed, Billed) and caller.principal is not None:
        billed.caller = caller


def refusal(refused: Refused) -> JSONResponse:
    """The HTTP answer to a refusal: its status, ``{"code", "message"}`` and Retry-After when waiting helps."""
    headers = {"Retry-After": str(max(1, math.ceil(refused.retry_after)))} if refused.retry_after else None
    return JSONResponse({"code": refused.code, "message": refused.message}, status_code=refused.status,
                        headers=headers)


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), time.monotonic()

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Buckets:
    """One bucket per name (a key id, an address), the least recently used forgotten past ``BUCKETS``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, name: str) -> float:
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = Bucket(self.rate, self.burst)
            if len(self._buckets) > BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
        return bucket.take()


class Limits:
    """The middleware (installed by ``app.create_app``); ``ctx`` is the gateway's context."""

    def __init__(self, app: ASGIApp, ctx: Any) -> None:
        self.app = app
        self.ctx = ctx
        s = ctx.settings
        self.settings = s
        self.per_key = Buckets(s.key_request_rate, s.key_request_burst)
        self.creations = Buckets(s.session_create_rate, s.session_create_burst)
        self.counts: dict[str, int] = {}
        self.counted_at = -math.inf
        self._openers: OrderedDict[tuple[str, str], str] = OrderedDict()  # session -> who owns it
        self._count_lock = asyncio.Lock()
        self._storage: tuple[float, int, int] = (-math.inf, 0, -1)  # when read, bytes held, max_bytes
        ctx.session_gate = self._admit_session  # a WebSocket's new session is admitted by ws.py

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        caller = self._caller(scope)
        try:
            self._rate(caller or Caller(None, _address(scope)))  # an invalid key counts as its address
            if _creates_session(scope):
                await self._admit_session(caller or Caller(None, _address(scope)))
            if scope["type"] == "http" and scope["method"] in BODY_METHODS and not FILE_ROUTE.search(scope["path"]):
                receive = await self._bounded_body(scope, receive)
        except Refused as refused:
            await self._refuse(scope, receive, send, refused)
            return
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send, caller)
            return
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ who and how fast

    def _caller(self, scope: Scope) -> Caller | None:
        """The caller as the key says (a dictionary look-up); None for a key that is not valid: the app
        answers that one (401), and it costs nothing here."""
        token = bearer(Headers(scope=scope).get("authorization"))
        try:
            return self.ctx.auth.caller(token, _address(scope))
        except Unauthorized:
            return None

    def _rate(self, caller: Caller) -> None:
        name = f"key:{caller.principal.key_id}" if caller.principal is not None else f"address:{caller.address}"
        wait = self.per_key.take(name)
        if wait:
            who = "this API key" if caller.principal is not None else "this client address (no API key)"
            raise Refused(429, "rate_limited", f"too many requests from {who}: at most "
                          f"{self.settings.key_request_rate:g} a second (bursts of {self.settings.key_request_burst}); "
                          f"retry in {wait:.1f} s", retry_after=wait)

    # ------------------------------------------------------------------ new sessions

    async def _admit_session(self, caller: Caller) -> None:
        wait = self.creations.take(f"address:{caller.address}")
        if wait:
            raise Refused(429, "rate_limited", f"too many new sessions from this client address: at most "
                          f"{self.settings.session_create_rate:g} a second (bursts of "
                          f"{self.settings.session_create_burst}); reuse a session (connect with ?session_id=) "
                          f"or retry in {wait:.1f} s", retry_after=wait)
        await self._check_storage()
        quota = self.settings.max_sessions_per_owner
        if quota <= 0:
            return
        who = _owner_name(caller.owner, caller.address)
        async with self._count_lock:
            if time.monotonic() - self.counted_at > COUNT_S:
                try:
                    self.counts = await self._count()
                except Exception as exc:  # noqa: BLE001  (the bus is down: the creation itself will say so)
                    self.ctx.log.warning("could not count the owner's sessions; quota not checked",
                                         error=repr(exc))
                    return
                self.counted_at = time.monotonic()
            held = self.counts.get(who, 0)
            if held >= quota:
                whose = f"owner {caller.owner!r}" if caller.owner else "this client address (no API key)"
                raise Refused(429, "session_quota", f"{whose} holds {held} sessions, the most allowed "
                              f"(PETRIBUS_MAX_SESSIONS_PER_OWNER={quota}); delete some (DELETE "
                              "/bots/{bot}/sessions/{id}) or reuse one", retry_after=None)
            self.counts[who] = held + 1

    async def _count(self) -> dict[str, int]:
        """Sessions per owner, from the log: every bot's subjects, each session's first event (remembered)."""
        counts: dict[str, int] = {}
        js = self.ctx.events.js
        for bot in self.ctx.nets:
            for session_id in await self.ctx.events.sessions(bot):
                key = (bot, session_id)
                who = self._openers.get(key)
                if who is None:
                    try:
                        first = decode((await js.get_msg(subjects.EVENTS_STREAM, seq=1, next=True,
                                                         subject=subjects.events(bot, session_id))).data or b"")
                    except (NotFoundError, ValueError):
                        continue  # deleted meanwhile, or unreadable: nobody's to count
                    actor = first.actor
                    who = _owner_name(actor.owner if actor else None, actor.address if actor else None)
                    self._openers[key] = who
                    if len(self._openers) > BUCKETS:
                        self._openers.popitem(last=False)
                counts[who] = counts.get(who, 0) + 1
        return counts

    async def _check_storage(self) -> None:
        read_at, held, most = self._storage
        if time.monotonic() - read_at > STORAGE_S:
            try:
                info = await self.ctx.events.js.stream_info(subjects.EVENTS_STREAM)
            except Exception as exc:  # noqa: BLE001  (the bus is down: the request itself will say so)
                self.ctx.log.warning("could not read the session log's size; not checked", error=repr(exc))
                return
            held, most = info.state.bytes, info.config.max_bytes or -1
            self._storage = (time.monotonic(), held, most)
        if most > 0 and held >= self.settings.new_sessions_max_fill * most:
            raise Refused(507, "storage_full", f"no new sessions for now: the session log holds {held} of its "
                          f"{most} bytes (PETRIBUS_EVENTS_MAX_BYTES), and the rest is kept for the sessions "
                          "already live. Delete sessions you no longer need, or ask the operator for room",
                          retry_after=None, close=CLOSE_STORAGE)

    # ------------------------------------------------------------------ bodies

    async def _bounded_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the body up to the limit (413 past it), check its JSON shape (422), and hand it on."""
        most = self.settings.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > most:
            raise Refused(413, "body_too_large", _too_large(int(declared), most))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay(b"", message, receive)  # the client left: let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > most:
                raise Refused(413, "body_too_large", _too_large(size, most, at_least=True))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # Every route that takes a body here parses it as JSON, and FastAPI does so for any spelling of
        # application/json (and for none): the shape is checked whatever the Content-Type says, or a
        # deep body would reach the parser under "application/JSON". A body that is not JSON at all is
        # refused by the route anyway.
        if body:
            try:
                inputs.check_shape(body.decode("utf-8"), "the request body")
            except UnicodeDecodeError as exc:
                raise Refused(422, "invalid_utf8", f"the request body is not UTF-8 ({exc.reason} at byte "
                              f"{exc.start}); send JSON as UTF-8 text") from None
            except InvalidInput as exc:
                raise Refused(422, exc.code, exc.message) from None
        return _replay(body, None, receive)

    # ------------------------------------------------------------------ WebSockets

    async def _socket(self, scope: Scope, receive: Receive, send: Send, caller: Caller | None) -> None:
        """Pass the connection on, counting its messages; one over the rate is answered here, not processed."""
        lock = asyncio.Lock()
        accepted = False
        billed = scope[BILLED] = Billed(caller)  # a key that comes in a message is named here by ws.py
        mine = Bucket(self.settings.ws_message_rate, self.settings.ws_message_burst)
        bot = (NEW_SOCKET.match(scope["path"]) or re.match(r"^/bots/([^/]+)/", scope["path"]) or [None, ""])[1]

        async def locked_send(message: Message) -> None:
            nonlocal accepted
            async with lock:
                await send(message)
            accepted = accepted or message["type"] == "websocket.accept"

        async def limited_receive() -> Message:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive" or not accepted:
                    return message
                wait = mine.take() if self.settings.ws_message_rate > 0 else 0.0
                try:
                    if wait:
                        raise Refused(429, "rate_limited", f"too many messages on this connection: at most "
                                      f"{self.settings.ws_message_rate:g} a second (bursts of "
                                      f"{self.settings.ws_message_burst}); this one was not processed, send "
                                      f"it again in {wait:.1f} s", retry_after=wait)
                    if billed.caller is not None:
                        self._rate(billed.caller)
                except Refused as refused:
                    error = ErrorEvent(bot=bot, session_id="", code=refused.code, message=refused.message)
                    async with lock:
                        await send({"type": "websocket.send", "text": json.dumps(to_client(error, None))})
                    continue
                return message

        await self.app(scope, limited_receive, locked_send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refused: Refused) -> None:
        log.info("request refused", code=refused.code, path=scope.get("path"), address=_address(scope))
        if scope["type"] == "http":
            await refusal(refused)(scope, receive, send)
            return
        # Accept, then refuse: a close during the handshake reaches a client as a bare HTTP 403.
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        bot = (NEW_SOCKET.match(scope["path"]) or [None, ""])[1]
        error = ErrorEvent(bot=bot, session_id="", code=refused.code, message=refused.message)
        await send({"type": "websocket.send", "text": json.dumps(to_client(error, None))})
        await send({"type": "websocket.close", "code": refused.close,
                    "reason": reasons.close_reason(refused.message, refused.code)})


def _creates_session(scope: Scope) -> bool:
    """``POST /bots/{bot}/sessions``, which always starts a session. A fork is admitted by its route, which
    knows whether it is a keyed retry of one that landed; a WebSocket's session by ``ws.py`` once its
    caller is known (both through ``GatewayContext.admit_session``)."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    return NEW_SESSION.match(scope["path"]) is not None


def _owner_name(owner: str | None, address: str | None) -> str:
    return f"owner:{owner}" if owner is not None else f"address:{address}"


def _address(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _too_large(size: int, most: int, *, at_least: bool = False) -> str:
    return (f"the request body is {'over ' if at_least else ''}{size} bytes, larger than this gateway's limit of "
            f"{most} bytes (PETRIBUS_MAX_BODY_BYTES); send less (large inputs belong in files)")


def _replay(body: bytes, first: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read (or the message that ended it), then goes on."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first if first is not None else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
