"""One WebSocket connection to one session: the session's log streamed out, client messages appended in.

``/bots/{bot}/ws`` starts a session (its first event is ``session_created``);
``/bots/{bot}/ws?session_id=ID&since=SEQ`` follows an existing one from after ``SEQ``. Every client just
streams the session's subject from a sequence through an ordered JetStream push consumer, so a
reconnect with the last ``seq`` it saw loses nothing and repeats nothing.

Three tasks per connection: a pump (consumer -> outbox), a reader (client -> log, or an error back)
and the one writer that owns the socket's send side, so stream events and error replies never
interleave mid-frame. A refused client message gets an ``error`` event sent to that client only; it
never enters the log and the connection stays open. So does one the bus could not take (NATS down or
failing over: code ``bus_unavailable``), echoing its ``request_id``; sent again with that same
``request_id``, it lands once (``idempotency``).

Who may connect (``auth.py``): the ``Authorization: Bearer`` header, or, from a browser (which cannot set
headers on a WebSocket), ``{"type": "auth", "token": ...}`` as the first message, awaited for
``AUTH_DEADLINE_S`` only when the bot needs a key and no header came. A bot that needs a key and gets
none is closed with 4401; another owner's session is closed with 4404, exactly like an unknown one.
Every event a client's message appends records the caller as its ``actor``, and once the key is known
the connection's messages spend that key's request budget, the one its REST calls spend too
(``limits.bill_socket``). A new session is admitted
(rate, storage, the owner's quota: ``limits``) here, once the caller is known, so that it is charged to
the key's owner even when the key came in the first message.

Answers (accept/reject a confirmation, a confirm_response) are checked against a fold of the session
that the connection keeps and brings up to date before each answer, and appended at the sequence they
were checked at: an unknown or already answered id is refused, and of two clients answering at once
exactly one answer lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, WebSocket
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected, WebSocketState

from petribus import subjects, tracing
from petribus.core import SessionState
from petribus.deletion import SessionDeleted
from petribus.errors import AlreadyAnswered, InvalidInput, PetribusError, UnknownBot, UnknownSession
from petribus.events import ConfirmResponse, ErrorEvent, decode, to_client
from petribus.net import Net
from petribus.outage import on_reconnect, retry
from petribus_gateway import deltas, errors, idempotency, inputs, reasons
from petribus_gateway.deployments import needs_key
from petribus_gateway.auth import (
    AUTH_DEADLINE_S,
    CLOSE_UNAUTHORIZED,
    Caller,
    Unauthorized,
    address,
    auth_message,
    bearer,
    masked,
)
from petribus_gateway.context import GatewayContext, context
from petribus_gateway.limits import Refused, bill_socket

CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400
CLOSE_STREAM_LOST = 1011
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "Try Again Later": the bus is unavailable for now
# How a client going away shows up: starlette's own errors, or uvicorn's ClientDisconnected (an OSError).
DISCONNECTED = (WebSocketDisconnect, WebSocketDisconnected, OSError)
OUTBOX_SIZE = 256  # events queued for a slow client before the pump (and so the consumer) waits
# Events the subscription delivered that the pump has not taken yet. Past this the client is too slow:
# the stream ends with a gap and the client resumes with ``since`` (as nats-py's own limit would do).
DELIVERED_MAX = 65_536

router = APIRouter()


@router.websocket("/bots/{bot}/ws")
async def session_socket(
    websocket: WebSocket, bot: str, ctx: Annotated[GatewayContext, Depends(context)]
) -> None:
    # Accept before refusing: a close during the handshake reaches the client as a bare HTTP 403.
    await websocket.accept()
    asked = websocket.query_params.get("session_id") or ""
    try:
        caller = await _authenticate(ctx, websocket, bot)
        bill_socket(websocket.scope, caller)  # a key from the first message spends its own budget from now on
        net = ctx.auth.net(ctx.nets, bot, caller)
        session_id, since = await _open(ctx, net, websocket.query_params, caller)
    except Unauthorized as exc:
        ctx.log.info("connection refused", bot=bot, reason=exc.code, address=address(websocket))
        await _refuse(websocket, bot, asked, exc, CLOSE_UNAUTHORIZED)
        return
    except (UnknownBot, UnknownSession) as exc:
        await _refuse(websocket, bot, asked, exc, CLOSE_NOT_FOUND)
        return
    except InvalidInput as exc:
        await _refuse(websocket, bot, asked, exc, CLOSE_BAD_REQUEST)
        return
    except Refused as refused:  # a new session over the owner's quota, the rate, or a full log
        ctx.log.info("connection refused", bot=bot, reason=refused.code, address=address(websocket))
        await _refuse(websocket, bot, asked, PetribusError(refused.message, code=refused.code), refused.close)
        return
    except Exception as exc:
        bus = errors.bus_failure(exc)
        if bus is None:
            raise
        ctx.log.warning("cannot open session", bot=bot, session_id=asked, error=repr(exc))
        unavailable = bus.code == errors.UNAVAILABLE
        message = (f"the session log (NATS) is unavailable right now (restarting or failing over); connect "
                   f"again in {errors.RETRY_AFTER_S} s" if unavailable else
                   "the session log refused to open this session; the gateway's log says why")
        await _refuse(websocket, bot, asked, PetribusError(message, code=bus.code),
                      CLOSE_TRY_AGAIN if unavailable else CLOSE_STREAM_LOST)
        return
    await SessionSocket(ctx, websocket, net, session_id, since, caller).run()


async def _authenticate(ctx: GatewayContext, websocket: WebSocket, bot: str) -> Caller:
    """The caller: from the Authorization header; else, where the bot needs a key, from the first message."""
    token = bearer(websocket.headers.get("authorization"))
    if token is not None:
        return ctx.auth.caller(token, address(websocket))
    net = ctx.nets.get(bot)
    if net is None or not (needs_key(net) and ctx.auth.required()):
        return Caller(None, address(websocket))
    missing = Unauthorized(f"bot {bot!r} needs an API key: send 'Authorization: Bearer <token>', or "
                           "{\"type\": \"auth\", \"token\": ...} as the first message within "
                           f"{AUTH_DEADLINE_S:g} s")
    try:
        message = await asyncio.wait_for(websocket.receive(), AUTH_DEADLINE_S)
    except TimeoutError:
        raise missing from None
    if message["type"] == "websocket.disconnect":
        raise missing
    try:
        token = auth_message(inputs.frame_text(message, ctx.settings.gateway_max_message_bytes))
    except InvalidInput:
        token = None
    if token is None:
        raise missing
    return ctx.auth.caller(token, address(websocket))


async def _open(ctx: GatewayContext, net: Net, params: QueryParams, caller: Caller) -> tuple[str, int]:
    """(session id, since): a new session from 0, or an existing one from the client's ``since``."""
    session_id = params.get("session_id")
    raw_since = params.get("since")
    since = 0
    if raw_since is not None:
        if not raw_since.isdigit():
            raise InvalidInput(
                f"since={raw_since[:40]!r} is not a sequence number; pass the seq of the last event you "
                "received (a whole number >= 0), or leave it out to receive the whole session",
                code="invalid_since",
            )
        since = int(raw_since)
    if session_id is None:
        if raw_since is not None:
            raise InvalidInput("since needs a session_id: pass the session_id it belongs to",
                               code="invalid_since")
        # Admitted here, not by the limits middleware: only now is the owner known when the key came in
        # the first message, and the session is charged to that owner, not to the client's address.
        await ctx.admit_session(caller)
        session_id, _ = await ctx.create_session(net, caller.actor())
        return session_id, 0
    await ctx.require_visible(net, session_id, caller)
    return session_id, since


async def _refuse(websocket: WebSocket, bot: str, session_id: str, exc: PetribusError, code: int) -> None:
    error = ErrorEvent(bot=bot, session_id=session_id, code=exc.code, message=exc.message)
    with contextlib.suppress(*DISCONNECTED):  # a client that already left needs no answer
        await websocket.send_text(json.dumps(to_client(error, None)))
        await websocket.close(code, reasons.close_reason(exc.message, exc.code))




class StreamGap(Exception):
    """The session's stream skipped an event; the connection must end so the client can resume."""


class SessionSocket:
    def __init__(self, ctx: GatewayContext, websocket: WebSocket, net: Net, session_id: str,
                 since: int, caller: Caller | None = None) -> None:
        self.ctx = ctx
        self.caller = caller or Caller(None, address(websocket))
        self.ws = websocket
        self.net = net
        self.session_id = session_id
        self.since = since
        self.max_bytes = ctx.settings.gateway_max_message_bytes
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(OUTBOX_SIZE)
        self.last_seq = since
        self.state = SessionState()  # folded only when an answer needs checking
        self._sub: JetStreamContext.PushSubscription | None = None
        # The subscription hands each message here from its callback: the pump takes what is there
        # without a task per message (nats-py's ``next_msg`` makes two). Entries carry the generation
        # of the subscription they came from; None only wakes the pump.
        self._delivered: asyncio.Queue[tuple[int, Msg] | None] = asyncio.Queue(DELIVERED_MAX)
        self._generation = 0
        self._overflow = False
        self._resubscribe = False
        self.log = ctx.log.bind(bot=net.bot, session_id=session_id)

    async def run(self) -> None:
        try:
            self._sub = await self._subscribe(self.since)
        except Exception as exc:  # nats-py raises several unrelated types here
            self.log.error("cannot stream session", error=repr(exc))
            await self._close(CLOSE_STREAM_LOST, f"cannot stream now; reconnect with since={self.since}")
            return
        self.log.info("client connected", since=self.since)
        # Live pieces of replies (not in the log) go to the same outbox, so the one writer sends them.
        live = await deltas.follow(self.ctx.nc, self.net.bot, self.session_id, self.outbox, self.log)
        unhook = on_reconnect(self.ctx.nc, self._bus_back)
        pump = asyncio.create_task(self._pump(), name=f"ws:{self.session_id}:pump")
        revoked = asyncio.create_task(self._key_revoked(), name=f"ws:{self.session_id}:key")
        tasks = [pump, asyncio.create_task(self._read(), name=f"ws:{self.session_id}:read"),
                 asyncio.create_task(self._write(), name=f"ws:{self.session_id}:write"), revoked]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unhook()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._unsubscribe(self._sub)
            if live is not None:
                await self._unsubscribe(live)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if task is pump:
                # The stream ended under a live client (NATS went away): tell it where to resume.
                self.log.warning("event stream ended", error=repr(failure), last_seq=self.last_seq)
                await self._close(CLOSE_STREAM_LOST, f"stream lost; reconnect with since={self.last_seq}")
            elif task is revoked and failure is None:
                self.log.info("key revoked: connection closed", key_id=self.caller.principal and
                              self.caller.principal.key_id)
                await self._close(CLOSE_UNAUTHORIZED, "the API key of this connection was revoked")
            elif failure is not None and not isinstance(failure, DISCONNECTED):
                self.log.error("connection failed", error=repr(failure), exc_info=failure)
                await self._close(CLOSE_STREAM_LOST, f"gateway error; reconnect with since={self.last_seq}")
        self.log.info("client disconnected", last_seq=self.last_seq)

    async def _subscribe(self, after: int) -> JetStreamContext.PushSubscription:
        if after == 0:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
        self._generation += 1
        generation = self._generation

        async def delivered(msg: Msg) -> None:
            try:
                self._delivered.put_nowait((generation, msg))
            except asyncio.QueueFull:
                self._overflow = True

        return await self.ctx.events.js.subscribe(subjects.events(self.net.bot, self.session_id),
                                                  stream=subjects.EVENTS_STREAM, ordered_consumer=True,
                                                  config=config, cb=delivered)

    async def _unsubscribe(self, sub: JetStreamContext.PushSubscription | None) -> None:
        nc = self.ctx.nc
        if sub is None or nc.is_closed or nc.is_draining:
            return  # the connection's own shutdown removes the subscription
        try:
            await sub.unsubscribe()
        except Exception as exc:  # already gone; nothing left to release
            self.log.debug("unsubscribe failed", error=repr(exc))

    async def _bus_back(self) -> None:
        """NATS is back: stream again at once from what was pumped, rather than when the ordered
        consumer notices its missed heartbeats (some 20 s after a server restart)."""
        self._resubscribe = True
        with contextlib.suppress(asyncio.QueueFull):  # full: the pump is not waiting anyway
            self._delivered.put_nowait(None)

    async def _next_msg(self, after: int) -> Msg | None:
        """The subscription's next message; None when it was replaced (NATS came back) meanwhile."""
        if self._resubscribe:
            self._resubscribe = False
            old = self._sub
            self._sub = await retry(self.ctx.nc, f"streaming {self.session_id} again",
                                    lambda _: self._subscribe(after), budget_s=self.ctx.outage_s)
            await self._unsubscribe(old)
            self.log.info("event stream resumed", after=after)
            return None
        while True:
            if self._overflow:
                raise StreamGap(f"the client reads slower than its session's events arrive "
                                f"({DELIVERED_MAX} waiting)")
            entry = self._delivered.get_nowait() if not self._delivered.empty() else await self._delivered.get()
            if entry is None:
                return None  # woken to subscribe again
            generation, msg = entry
            if generation == self._generation:
                return msg  # (a replaced subscription's late messages are dropped)

    async def _pump(self) -> None:
        last_stream, last_consumer = self.since, 0
        while True:
            msg = await self._next_msg(last_stream)
            if msg is None:
                last_consumer = 0  # a new consumer counts from 1
                continue
            seq, consumer_seq = msg.metadata.sequence.stream, msg.metadata.sequence.consumer
            if consumer_seq not in (last_consumer + 1, 1):
                # A message was dropped on our side (nats-py drops for a slow consumer without resetting
                # the ordered consumer): end the stream so the client resumes from what it really has.
                raise StreamGap(f"consumer sequence jumped from {last_consumer} to {consumer_seq}")
            last_consumer = consumer_seq
            if seq <= last_stream:
                continue  # a reset ordered consumer re-sent what we already have
            last_stream = seq
            try:
                event = decode(msg.data)
            except ValidationError:
                self.log.error("skipping undecodable event", seq=seq)
                continue
            await self.outbox.put(to_client(event, seq))

    async def _write(self) -> None:
        while True:
            payload = await self.outbox.get()
            await self.ws.send_text(json.dumps(payload))
            seq = payload["metadata"]["seq"]
            if seq is not None:
                self.last_seq = seq  # what the client has: where it should resume from

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            # Each client message begins a trace: its append, the firings it enables, the model's answer.
            with tracing.span("gateway ws message", root=True, kind="server", attributes={
                    "petribus.bot": self.net.bot, "petribus.session_id": self.session_id}):
                await self._handle(message)

    async def _handle(self, message: Message) -> None:
        request_id = None
        try:
            text = inputs.frame_text(message, self.max_bytes)
            token = auth_message(text)
            if token is not None:
                await self._authenticated(token)
                return
            payload = inputs.parse(text)
            request_id = payload.get("request_id")
            tracing.set_attributes({"petribus.message_type": payload.get("type"),
                                    "petribus.request_id": request_id})
            event = inputs.to_event(self.net, self.session_id, payload).model_copy(
                update={"actor": self.caller.actor()})
        except InvalidInput as exc:
            # The error quotes what the client sent, which may be a token (a broken auth message).
            self.log.info("client message refused", code=exc.code, error=masked(exc.message))
            await self._error(exc.code, masked(exc.message), request_id)
            return
        try:
            await self.ctx.bus_ready()
            seq, replayed = await self._append(event, request_id)
        except InvalidInput as exc:  # nothing (or no longer anything) to answer; a key reused
            self.log.info("client message refused", code=exc.code, error=exc.message)
            await self._error(exc.code, exc.message, request_id)
            return
        except SessionDeleted as exc:  # deleted while this socket was open: every message is refused
            self.log.info("client message refused: its session was deleted")
            await self._error(exc.code, exc.message, request_id)
            return
        except Exception as exc:
            bus = errors.bus_failure(exc)
            if bus is None:
                raise
            self.log.warning("append failed", type=payload["type"], request_id=request_id, error=repr(exc))
            if bus.code == errors.UNAVAILABLE:
                message = (f"your {payload['type']} was not recorded: the session log (NATS) is unavailable "
                           f"right now (restarting or failing over). Send it again in {errors.RETRY_AFTER_S} s "
                           "with the same request_id: it is then recorded exactly once")
            elif bus.code == errors.STORAGE_FULL:
                message = f"your {payload['type']} was not recorded: {bus.message}"
            else:
                message = (f"your {payload['type']} was not recorded: the session log refused it; "
                           "the gateway's log says why")
            await self._error(bus.code, message, request_id)
            return
        self.log.debug("client event appended", type=payload["type"], seq=seq, replayed=replayed)

    async def _key_revoked(self) -> None:
        """Return when the key this connection speaks with is revoked: it may not go on listening either."""
        keys = self.ctx.keys
        if keys is None:
            await asyncio.Future()  # no keys, nothing to revoke: wait for the connection to end
        assert keys is not None
        while True:
            principal = self.caller.principal
            if principal is not None and not keys.is_live(principal.key_id):
                return
            await keys.changed()

    async def _authenticated(self, token: str) -> None:
        """An auth message after the opening (a browser that always sends one, to a bot that did not need it):
        a valid key becomes the actor of what follows; anything else is refused with an error event."""
        try:
            caller = self.ctx.auth.caller(token, self.caller.address)
        except Unauthorized as exc:
            await self._error(exc.code, exc.message, None)
            return
        if self.caller.principal is not None and caller.principal != self.caller.principal:
            await self._error("unauthorized", "this connection already has a key; connect again to use another",
                              None)
            return
        if caller.principal is not None and not caller.principal.may_use(self.net.bot):
            await self._error("unauthorized", f"this key may not use bot {self.net.bot!r}", None)
            return
        self.caller = caller
        bill_socket(self.ws.scope, caller)

    async def _append(self, event: Any, request_id: str | None) -> tuple[int, bool]:
        """Append a client's event, once per ``request_id`` (its idempotency key); (seq, replayed)."""
        if isinstance(event, inputs.ANSWERS):
            # A confirm_response's request_id is the question's id, not a key of the client's.
            keyed = request_id is not None and not isinstance(event, ConfirmResponse)
            if keyed:
                event = idempotency.keyed(event, request_id)  # type: ignore[arg-type]
            try:
                seq, _ = await inputs.append_answer(self.ctx.events, event, state=self.state)
            except AlreadyAnswered:
                # A resend of an answer that landed: the client has it (or gets it) in the stream.
                found = await idempotency.find(self.ctx.events, event) if keyed else None
                if found is None:
                    raise
                return found[0], True
            return seq, False
        if request_id is None:
            return await self.ctx.events.append(event), False
        # A resend that landed before is not appended again: the stream shows the first one only.
        seq, _, replayed = await idempotency.append(self.ctx.events, event, request_id)
        return seq, replayed

    async def _error(self, code: str, message: str, request_id: str | None) -> None:
        error = ErrorEvent(bot=self.net.bot, session_id=self.session_id, code=code, message=message,
                           request_id=request_id)
        await self.outbox.put(to_client(error, None))

    async def _close(self, code: int, reason: str) -> None:
        connected = WebSocketState.CONNECTED
        if self.ws.application_state == connected and self.ws.client_state == connected:
            try:
                await self.ws.close(code, reasons.close_reason(reason))
            except Exception as exc:  # the client left meanwhile
                self.log.debug("close failed", error=repr(exc))
