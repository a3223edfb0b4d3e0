"""REST routes: bots, sessions (listed, read, written, deleted), answers and health, all from the log."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import JSONResponse
from nats.js.errors import NotFoundError

from petribus import deletion, subjects, tracing
from petribus.bus import WrongLastSequence
from petribus.core import SessionState
from petribus.deploy import DEFAULT_ENV
from petribus.errors import AlreadyAnswered, InvalidInput
from petribus.events import HaltSet, InputFileResponse, SessionForked, _Event, decode, new_id, to_client
from petribus.net import Net
from petribus_gateway import fork as forking
from petribus_gateway import deployments, idempotency, inputs, limits
from petribus_gateway.auth import CallerDep, guard
from petribus_gateway.context import GatewayContext, bus_ready, check_session_id, context, unknown_session
from petribus_gateway.models import (
    Answer,
    Appended,
    BotInfo,
    ChatTurnInfo,
    ClientEvent,
    ErrorBody,
    FileInfo,
    FiringInfo,
    ForkedInfo,
    ForkRequest,
    HaltRequest,
    Health,
    HistoryPage,
    HistoryStep,
    LocationInfo,
    NewMarker,
    NewMessage,
    PendingRequest,
    SessionCreatedInfo,
    SessionDetail,
    SessionList,
    SessionSummary,
    TransitionInfo,
)

Ctx = Annotated[GatewayContext, Depends(context)]
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {
    404: {"model": ErrorBody, "description": "No such bot or session (or not yours: the same answer)."},
    401: {"model": ErrorBody, "description": "The bot needs an API key (Authorization: Bearer), or the one "
          "sent is not valid."},
}
INVALID: Responses = {422: {"model": ErrorBody, "description": "Invalid input; nothing was appended."}}
UNAVAILABLE: Responses = {503: {
    "model": ErrorBody, "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                                    "schema": {"type": "integer"}}},
    "description": "The session log (NATS) is unavailable for now: retry after Retry-After seconds "
                   "(a write with the same Idempotency-Key lands once)."}}
ERRORS: Responses = {**NOT_FOUND, **INVALID, **UNAVAILABLE}
KEYED: Responses = {
    400: {"model": ErrorBody, "description": "An Idempotency-Key that is not 1-128 printable ASCII characters."},
    409: {"model": ErrorBody, "description": "The Idempotency-Key already named a different request."},
}
LIMITED: Responses = {
    429: {"model": ErrorBody, "description": "Over the owner's session quota (session_quota) or the new-session "
          "rate (rate_limited, with Retry-After)."},
    507: {"model": ErrorBody, "description": "The session log is too full for new sessions (storage_full)."},
}
ANSWER_ERRORS: Responses = {
    404: {"model": ErrorBody, "description": "No such bot, session, task or request."},
    409: {"model": ErrorBody, "description": "It no longer waits: answered, timed out, or ended."},
    **INVALID, **UNAVAILABLE, 400: KEYED[400],
}
REPLAYED = "Idempotent-Replayed"
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="Names this request (1-128 printable ASCII characters, e.g. a uuid4). Send the same key "
                "when you retry it: it lands once, and the retry gets the first answer back with the "
                "header Idempotent-Replayed: true.")]

AtSeq = Annotated[int | None, Query(ge=1, description="Answer as of this sequence of the session's log: the "
                                   "events up to it and the state they fold to. Default: now.")]
WithEvents = Annotated[bool, Query(description="false: leave the events out of the body (the state only).")]
MAX_HISTORY = 1000

# Every route is guarded: the caller's key, and the same 404 for what it may not see (auth.py).
router = APIRouter(dependencies=[Depends(guard)])


def bot_net(bot: str, ctx: Ctx) -> Net:
    return ctx.net(bot)


BotNet = Annotated[Net, Depends(bot_net)]


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
async def healthz(ctx: Ctx) -> JSONResponse:
    """200 while the gateway is connected to NATS, 503 otherwise."""
    nc = ctx.nc
    state = ("connected" if nc.is_connected else "closed" if nc.is_closed
             else "reconnecting" if nc.is_reconnecting else "disconnected")
    body = Health(status="ok" if state == "connected" else "unavailable", nats=state,  # type: ignore[arg-type]
                  pools=await _pools_line(ctx) if state == "connected" else None)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.status == "ok" else 503)


async def _pools_line(ctx: Any) -> str | None:
    """GET /pools in one line, if the bus answers within a second: a health check must answer anyway."""
    from petribus.registry import Registry
    from petribus_gateway.pools import overview, summary

    js = ctx.events.js
    try:
        async with asyncio.timeout(1.0):
            return summary(await overview(js, Registry(js, heartbeat_s=ctx.settings.registry_heartbeat_s,
                                                       replicas=ctx.settings.replicas), ctx.nets))
    except Exception:  # noqa: BLE001  (the pools line is extra; the health answer stands without it)
        return None


@router.get("/bots", response_model=list[BotInfo], tags=["bots"])
async def list_bots(ctx: Ctx, caller: CallerDep) -> list[BotInfo]:
    """Every bot this gateway serves to the caller, with its exposed locations (and their JSON schemas)
    and transitions. Under ``--deployments`` (docs/deployments.md), ``GET /bots`` and
    ``GET /envs/{env}/bots`` list each deployment of that environment once, by its name, with the
    version a new session gets; one whose environment needs a key is left out for a caller without one."""
    deployed = deployments.listing()
    if deployed is None:
        return [bot_info(net) for net in ctx.nets.values() if ctx.auth.may_use(caller, net)]
    plain = ([net for net in ctx.nets.values() if deployments.deployment_of(net.bot) is None]
             if (deployments.current_env() or DEFAULT_ENV) == DEFAULT_ENV else [])
    shown = [bot_info(net) for net in plain if ctx.auth.may_use(caller, net)]
    for each in deployed:
        net = ctx.nets.get(each.bot)
        with deployments.policy(each.authorized):
            if net is not None and ctx.auth.may_use(caller, net):
                shown.append(bot_info(net, name=each.name, version=each.version, deactivated=each.deactivated))
    return shown


@router.get("/bots/{bot}", response_model=BotInfo, responses=NOT_FOUND, tags=["bots"])
async def get_bot(net: BotNet) -> BotInfo:
    """The bot as ``GET /bots`` lists it. By a deployment's name: the version a new session gets."""
    name, version, deactivated = deployments.described(net.bot)
    return bot_info(net, name=name, version=version, deactivated=deactivated)


def bot_info(net: Net, *, name: str | None = None, version: str | None = None, deactivated: bool = False
             ) -> BotInfo:
    return BotInfo(
        name=name or net.bot, version=version, deactivated=deactivated, description=net.description,
        model=net.model, welcome_message=net.welcome_message,
        locations=[LocationInfo(name=loc.name, description=loc.description, json_schema=loc.json_schema())
                   for loc in net.locations.values() if loc.expose],
        transitions=[TransitionInfo(name=t.name, description=t.description, inputs=dict(t.inputs),
                                    outputs=list(t.outputs), confirm=t.confirm)
                     for t in net.transitions if t.expose],
        handoffs=[h.bot for h in net.handoffs],
    )


@router.get("/bots/{bot}/sessions", response_model=SessionList, responses=ERRORS, tags=["sessions"],
            dependencies=[Depends(bus_ready)], response_model_exclude_none=True)
async def list_sessions(net: BotNet, ctx: Ctx, caller: CallerDep) -> SessionList:
    """The caller's sessions of the bot still in the log (an admin key: everyone's), with the number of
    events each holds. By a deployment's name (docs/deployments.md): its sessions on every version loaded
    here, each with the version's bot."""
    name = deployments.current_deployment()
    nets = [net] if name is None else [n for n in ctx.nets.values() if deployments.deployment_of(n.bot) == name]
    mine = []
    for each in nets:
        found = await ctx.events.sessions(each.bot)
        for session_id, n in sorted(found.items()):
            exists, owner = ((True, None) if caller.admin
                             else await ctx.auth.owner_of(ctx.events.js, each.bot, session_id))
            if exists and ctx.auth.lists(caller, each, owner):
                mine.append(SessionSummary(session_id=session_id, events=n, bot=each.bot if name else None))
    return SessionList(bot=name or net.bot, sessions=mine)


@router.post("/bots/{bot}/sessions", response_model=SessionCreatedInfo, status_code=201, responses=ERRORS,
             tags=["sessions"])
async def create_session(net: BotNet, ctx: Ctx, caller: CallerDep) -> SessionCreatedInfo:
    """Start a session, owned by the caller's key's owner; connect to its WebSocket with ``?session_id=``
    to follow it."""
    session_id, seq = await ctx.create_session(net, caller.actor())
    return SessionCreatedInfo(session_id=session_id, seq=seq)


@router.get("/bots/{bot}/sessions/{session_id}", response_model=SessionDetail,
            responses=ERRORS, tags=["sessions"], dependencies=[Depends(bus_ready)])
async def get_session(net: BotNet, session_id: str, ctx: Ctx, at: AtSeq = None, events: WithEvents = True
                      ) -> SessionDetail:
    """The session's events (as clients see them) and its state, folded from them: now, or as of ``at``.

    Both come from the gateway's timeline of the session (its log read once, then only what is new): the
    state from its nearest snapshot, the events from their kept client form."""
    check_session_id(session_id)
    if at is None:
        state = await ctx.timeline.state_at(net.bot, session_id, None)
        if state.last_seq == 0:
            raise unknown_session(net.bot, session_id)
    else:
        state = await _state_at(ctx, net, session_id, at)
    body = _detail(net, session_id, state).model_dump_json().encode()
    if events:  # the events' JSON goes in as kept: a long log is neither decoded nor validated again
        shown = await ctx.timeline.client_events(net.bot, session_id, state.last_seq)
        body = body.replace(b'"events":[]', b'"events":' + shown, 1)  # the first: bot and id come before it,
        # and a string holds no unescaped quote
    return Response(body, media_type="application/json")  # type: ignore[return-value]


async def _state_at(ctx: GatewayContext, net: Net, session_id: str, at: int) -> SessionState:
    """The session's state as of ``at``: 404 for no such session, 422 for a sequence before its start."""
    state = await ctx.timeline.state_at(net.bot, session_id, at)
    if state.last_seq == 0:
        first = (await ctx.timeline.state_at(net.bot, session_id, None)).last_seq
        if first == 0:
            raise unknown_session(net.bot, session_id)
        first_seq = (await ctx.events.read(net.bot, session_id, until=first))[0][0]
        raise InvalidInput(f"at={at} is before session {session_id}'s first event (seq {first_seq}); "
                           f"ask for a sequence from {first_seq} on", code="invalid_seq")
    return state


def _detail(net: Net, session_id: str, state: SessionState) -> SessionDetail:
    """The session's body with no events (``get_session`` puts them in)."""
    return SessionDetail(
        bot=net.bot, session_id=session_id, last_seq=state.last_seq, events=[],
        marking=state.marking(),
        in_flight=[FiringInfo(firing_id=f.id, transition=f.transition, status=f.status, fired_seq=f.fired_seq,
                              consumed=[p.marker for p in f.consumed], attempts=f.attempts)
                   for f in state.in_flight.values()],
        chat=[ChatTurnInfo(role=t.role, text=t.text, seq=t.seq, event_id=t.event_id, firing_id=t.firing_id)
              for t in state.chat],
        memory=state.memory,
        pending_requests=[
            *(PendingRequest(type="confirm_request", request_id=rid, description=q.description,
                             task_id=q.firing_id, transition=q.transition, timeout=q.timeout)
              for rid, q in state.pending_requests.items()),
            *(PendingRequest(type="input_file_request", request_id=fid, description=q.description,
                             task_id=q.firing_id, transition=q.transition, upload_url=q.upload_url,
                             timeout=q.timeout)
              for fid, q in state.pending_files.items()),
        ],
        files=[FileInfo(file_id=key, name=f.name, size=f.size,
                        url=subjects.file_url(net.bot, session_id, key),
                        direction="input" if isinstance(f, InputFileResponse) else "output")
               for key, f in state.files.items()],
    )


@router.get("/bots/{bot}/sessions/{session_id}/history", response_model=HistoryPage, responses=ERRORS,
            tags=["time travel"], dependencies=[Depends(bus_ready)])
async def history(net: BotNet, session_id: str, ctx: Ctx,
                  after: Annotated[int, Query(ge=0, description="Steps after this sequence (0: from the "
                                              "start).")] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_HISTORY, description="Steps per page.")] = 100,
                  ) -> HistoryPage:
    """The session's steps after ``after``: each event with the markers it added and consumed, so a
    timeline can be scrubbed step by step. Each page folds from the gateway's nearest snapshot."""
    check_session_id(session_id)
    steps, last = await ctx.timeline.history(net.bot, session_id, after=after, limit=limit)
    if last == 0:
        raise unknown_session(net.bot, session_id)
    more = bool(steps) and steps[-1].seq < last
    return HistoryPage(
        bot=net.bot, session_id=session_id, last_seq=last, next=steps[-1].seq if more else None,
        steps=[HistoryStep(seq=s.seq, event=ClientEvent.model_validate(to_client(s.event, s.seq)),
                           added=s.added, consumed=s.consumed) for s in steps])


@router.post("/bots/{bot}/sessions/{session_id}/fork", response_model=ForkedInfo, status_code=201,
             responses={**ERRORS, **KEYED, **LIMITED}, tags=["time travel"], dependencies=[Depends(bus_ready)])
async def fork_session(net: BotNet, session_id: str, body: ForkRequest, ctx: Ctx, response: Response,
                       caller: CallerDep, idempotency_key: IdempotencyKey = None) -> ForkedInfo | JSONResponse:
    """A new session that starts from this one's state at ``at`` (see docs/time-travel.md): the marking
    (with the markers of firings in flight then put back), chat, memory and files. This session is
    untouched. With ``bot``, the fork runs on another bot, if every marker fits its net.

    A fork is a new session of whoever forks (quota, new-session rate, storage: docs/limits.md), admitted
    here rather than by the limits middleware: a retry with the same ``Idempotency-Key`` of a fork that
    landed is answered as the first time and is no new session, so it is not charged again."""
    check_session_id(session_id)
    target = ctx.auth.net(ctx.nets, body.bot, caller) if body.bot is not None else net
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    new_session = (new_id() if key is None
                   else uuid.uuid5(idempotency.NAMESPACE, f"fork:{net.bot}:{session_id}:{key}").hex)
    if key is not None:
        replayed = await _landed_fork(ctx, target, new_session, session_id, body.at, key)
        if replayed is not None:
            response.headers[REPLAYED] = "true"
            return replayed
    source = await _state_at(ctx, net, session_id, body.at)
    last = (await ctx.timeline.state_at(net.bot, session_id, None)).last_seq
    if body.at > last:
        raise InvalidInput(f"at={body.at} is past session {session_id}'s last event (seq {last}): a fork "
                           f"starts from a step that happened; use at <= {last}", code="invalid_seq")
    try:
        await ctx.admit_session(caller)
    except limits.Refused as refused:
        ctx.log.info("fork refused", bot=net.bot, session_id=session_id, code=refused.code,
                     owner=caller.owner, address=caller.address)
        return limits.refusal(refused)
    try:
        seq = await forking.fork(ctx.events, ctx.files, target, source, body.at, new_session, caller.actor())
    except WrongLastSequence:
        # Only a keyed retry names a session that exists: one racing the first try, which landed meanwhile.
        # (Both were admitted; the owner's count is read again from the log within limits.COUNT_S.)
        replayed = await _landed_fork(ctx, target, new_session, session_id, body.at, key) if key else None
        if replayed is None:
            raise _fork_key_reused(key, session_id) from None
        response.headers[REPLAYED] = "true"
        return replayed
    ctx.log.info("session forked", bot=net.bot, session_id=session_id, at=body.at, fork=new_session,
                 fork_bot=target.bot)
    return ForkedInfo(session_id=new_session, bot=target.bot, seq=seq, source_session=session_id,
                      source_seq=body.at)


async def _landed_fork(ctx: GatewayContext, target: Net, new_session: str, session_id: str, at: int,
                       key: str) -> ForkedInfo | None:
    """The first answer to the keyed fork ``new_session``, if it landed (None: it did not); 409 when the
    session under that id is not this fork (the key named another fork of the session)."""
    try:  # its first event only, from the stream leader (a fork's log grows once it runs)
        msg = await ctx.events.js.get_msg(subjects.EVENTS_STREAM, seq=1, next=True,
                                          subject=subjects.events(target.bot, new_session))
    except NotFoundError:
        return None
    forked = decode(msg.data or b"")
    if not (isinstance(forked, SessionForked) and forked.source_session == session_id and forked.source_seq == at):
        raise _fork_key_reused(key, session_id)
    return ForkedInfo(session_id=new_session, bot=target.bot, seq=msg.seq, source_session=session_id,
                      source_seq=at, replayed=True)


def _fork_key_reused(key: str | None, session_id: str) -> idempotency.IdempotencyKeyReused:
    return idempotency.IdempotencyKeyReused(
        f"Idempotency-Key {key!r} already named another fork of session {session_id}; use a new key",
        code="idempotency_key_reused")


@router.put("/bots/{bot}/sessions/{session_id}/halt", response_model=Appended, status_code=201,
            responses=ERRORS, tags=["time travel"])
async def set_halt(net: BotNet, session_id: str, body: HaltRequest, ctx: Ctx, caller: CallerDep) -> Appended:
    """Hold the next firings of these transitions before they run, as if they had ``confirm=True``: each
    is claimed, announced with ``confirm_transition``, and runs once accepted. ``[]`` clears it."""
    check_session_id(session_id)
    unknown = sorted({t for t in body.before if not net.has_transition(t)})
    if unknown:
        raise InvalidInput(f"bot {net.bot!r} has no transition(s) {unknown}; it has "
                           f"{[t.name for t in net.transitions]}", code="unknown_transition")
    await ctx.require_session(net.bot, session_id)
    event = HaltSet(bot=net.bot, session_id=session_id, before=list(dict.fromkeys(body.before)),
                    actor=caller.actor())
    seq = await ctx.events.append(event)
    return Appended(seq=seq, event=ClientEvent.model_validate(to_client(event, seq)))


@router.post("/bots/{bot}/sessions/{session_id}/markers", response_model=Appended, status_code=201,
             responses={**ERRORS, **KEYED}, tags=["sessions"])
async def add_marker(net: BotNet, session_id: str, body: NewMarker, ctx: Ctx, response: Response,
                     caller: CallerDep, idempotency_key: IdempotencyKey = None) -> Appended:
    """Add a marker to an exposed location, validated by the location's model."""
    check_session_id(session_id)
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    event = inputs.marker_added(net, session_id, body.location, body.data, source="api",
                                request_id=body.request_id).model_copy(update={"actor": caller.actor()})
    await ctx.require_session(net.bot, session_id)
    return await _append(ctx, event, key, response)


@router.post("/bots/{bot}/sessions/{session_id}/messages", response_model=Appended, status_code=201,
             responses={**ERRORS, **KEYED}, tags=["sessions"])
async def add_message(net: BotNet, session_id: str, body: NewMessage, ctx: Ctx, response: Response,
                      caller: CallerDep, idempotency_key: IdempotencyKey = None) -> Appended:
    """Say something in the session, as its user."""
    check_session_id(session_id)
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    event = inputs.user_message(net, session_id, body.text, request_id=body.request_id).model_copy(
        update={"actor": caller.actor()})
    await ctx.require_session(net.bot, session_id)
    return await _append(ctx, event, key, response)


async def _append(ctx: GatewayContext, event: _Event, key: str | None, response: Response) -> Appended:
    with _span(event):  # a trace begins with a client's write (docs/observability.md)
        if key is None:
            seq = await ctx.events.append(event)
            return Appended(seq=seq, event=ClientEvent.model_validate(to_client(event, seq)))
        seq, stored, replayed = await idempotency.append(ctx.events, event, key)
        return _appended(seq, stored, replayed, response)


def _span(event: _Event) -> Any:
    return tracing.span(f"gateway rest {event.type}", root=True, kind="server", attributes={
        "petribus.bot": event.bot, "petribus.session_id": event.session_id,
        "petribus.request_id": event.request_id})


def _appended(seq: int, event: _Event, replayed: bool, response: Response) -> Appended:
    if replayed:
        response.headers[REPLAYED] = "true"
    return Appended(seq=seq, event=ClientEvent.model_validate(to_client(event, seq)), replayed=replayed)


@router.post("/bots/{bot}/sessions/{session_id}/confirmations/{task_id}", response_model=Appended,
             status_code=201, responses=ANSWER_ERRORS, tags=["confirmations"])
async def answer_confirmation(net: BotNet, session_id: str, task_id: str, body: Answer, ctx: Ctx,
                              response: Response, caller: CallerDep, idempotency_key: IdempotencyKey = None
                              ) -> Appended:
    """Accept (run it) or reject (its markers go back) a firing that waits for confirmation.

    ``task_id`` is the ``metadata.task_id`` of its ``confirm_transition`` event.
    """
    check_session_id(session_id)
    if body.reason is not None and body.accepted:
        raise InvalidInput("a reason goes with a rejection only; leave it out or send accepted=false",
                           code="invalid_value")
    kind = "accept_transition" if body.accepted else "reject_transition"
    value = task_id if body.reason is None else {"task_id": task_id, "reason": body.reason}
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    event = inputs.task_answer(net, session_id, kind, value, inputs.snippet(task_id),
                               request_id=body.request_id)
    return await _answer(ctx, net, session_id, event.model_copy(update={"actor": caller.actor()}), key, response)


@router.post("/bots/{bot}/sessions/{session_id}/confirm_requests/{request_id}", response_model=Appended,
             status_code=201, responses=ANSWER_ERRORS, tags=["confirmations"])
async def answer_question(net: BotNet, session_id: str, request_id: str, body: Answer, ctx: Ctx,
                          response: Response, caller: CallerDep, idempotency_key: IdempotencyKey = None
                          ) -> Appended:
    """Answer a running transition's ``context.confirm`` question (a ``confirm_request`` event)."""
    check_session_id(session_id)
    if body.reason is not None or body.request_id not in (None, request_id):
        raise InvalidInput("answer a confirm request with {\"accepted\": true|false} only",
                           code="invalid_value")
    key = None if idempotency_key is None else idempotency.check_key(idempotency_key)
    event = inputs.confirm_response(net, session_id, body.accepted, "", request_id=request_id)
    return await _answer(ctx, net, session_id, event.model_copy(update={"actor": caller.actor()}), key, response)


async def _answer(ctx: GatewayContext, net: Net, session_id: str, event: Any, key: str | None,
                  response: Response) -> Appended:
    await ctx.require_session(net.bot, session_id)
    if key is not None:
        event = idempotency.keyed(event, key)
    with _span(event):
        try:
            seq, appended = await inputs.append_answer(ctx.events, event)
        except AlreadyAnswered:
            # A retry of this very answer (same key) is answered as the first time; anyone else's is refused.
            found = None if key is None else await idempotency.find(ctx.events, event)
            if found is None:
                raise
            return _appended(*found, True, response)
        return _appended(seq, appended, False, response)


@router.delete("/bots/{bot}/sessions/{session_id}", status_code=204, responses=ERRORS,
               tags=["sessions"])
async def delete_session(net: BotNet, session_id: str, ctx: Ctx) -> Response:
    """Delete the session's whole log and its files. It cannot be undone, and it sticks: what a firing
    still running appends for it later is refused (docs/limits.md)."""
    await ctx.require_session(net.bot, session_id)
    await deletion.delete_session(ctx.events, ctx.files, net.bot, session_id)
    ctx.timeline.forget(net.bot, session_id)
    ctx.auth.forget(net.bot, session_id)
    ctx.log.info("session deleted", bot=net.bot, session_id=session_id)
    return Response(status_code=204)
