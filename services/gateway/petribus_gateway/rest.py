"""REST routes: bots, sessions (listed, read, written, deleted) and health. Everything comes from the log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from petribus.core import fold
from petribus.events import to_client
from petribus.net import Net
from petribus_gateway import inputs
from petribus_gateway.context import GatewayContext, check_session_id, context, unknown_session
from petribus_gateway.models import (
    Appended,
    BotInfo,
    ChatTurnInfo,
    ClientEvent,
    ErrorBody,
    FiringInfo,
    Health,
    LocationInfo,
    NewMarker,
    NewMessage,
    SessionCreatedInfo,
    SessionDetail,
    SessionList,
    SessionSummary,
    TransitionInfo,
)

Ctx = Annotated[GatewayContext, Depends(context)]
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No such bot or session."}}
INVALID: Responses = {422: {"model": ErrorBody, "description": "Invalid input; nothing was appended."}}
ERRORS: Responses = {**NOT_FOUND, **INVALID}

router = APIRouter()


def bot_net(bot: str, ctx: Ctx) -> Net:
    return ctx.net(bot)


BotNet = Annotated[Net, Depends(bot_net)]


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
async def healthz(ctx: Ctx) -> JSONResponse:
    """200 while the gateway is connected to NATS, 503 otherwise."""
    nc = ctx.nc
    state = ("connected" if nc.is_connected else "closed" if nc.is_closed
             else "reconnecting" if nc.is_reconnecting else "disconnected")
    body = Health(status="ok" if state == "connected" else "unavailable", nats=state)  # type: ignore[arg-type]
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


@router.get("/bots", response_model=list[BotInfo], tags=["bots"])
async def list_bots(ctx: Ctx) -> list[BotInfo]:
    """Every bot this gateway serves, with its exposed locations (and their JSON schemas) and transitions."""
    return [
        BotInfo(
            name=net.bot, description=net.description, model=net.model, welcome_message=net.welcome_message,
            locations=[LocationInfo(name=loc.name, description=loc.description, json_schema=loc.json_schema())
                       for loc in net.locations.values() if loc.expose],
            transitions=[TransitionInfo(name=t.name, description=t.description, inputs=dict(t.inputs),
                                        outputs=list(t.outputs), confirm=t.confirm)
                         for t in net.transitions if t.expose],
        )
        for net in ctx.nets.values()
    ]


@router.get("/bots/{bot}/sessions", response_model=SessionList, responses=ERRORS, tags=["sessions"])
async def list_sessions(net: BotNet, ctx: Ctx) -> SessionList:
    """The bot's sessions still in the log, with the number of events each holds."""
    found = await ctx.events.sessions(net.bot)
    return SessionList(bot=net.bot,
                       sessions=[SessionSummary(session_id=s, events=n) for s, n in sorted(found.items())])


@router.post("/bots/{bot}/sessions", response_model=SessionCreatedInfo, status_code=201, responses=ERRORS,
             tags=["sessions"])
async def create_session(net: BotNet, ctx: Ctx) -> SessionCreatedInfo:
    """Start a session; connect to its WebSocket with ``?session_id=`` to follow it."""
    session_id, seq = await ctx.create_session(net)
    return SessionCreatedInfo(session_id=session_id, seq=seq)


@router.get("/bots/{bot}/sessions/{session_id}", response_model=SessionDetail,
            responses=ERRORS, tags=["sessions"])
async def get_session(net: BotNet, session_id: str, ctx: Ctx) -> SessionDetail:
    """The session's events (as clients see them) and its current state, folded from them."""
    check_session_id(session_id)
    log = await ctx.events.read(net.bot, session_id)
    if not log:
        raise unknown_session(net.bot, session_id)
    state = fold(log)
    return SessionDetail(
        bot=net.bot, session_id=session_id, last_seq=state.last_seq,
        events=[ClientEvent.model_validate(to_client(ev, seq)) for seq, ev in log],
        marking=state.marking(),
        in_flight=[FiringInfo(firing_id=f.id, transition=f.transition, status=f.status, fired_seq=f.fired_seq,
                              consumed=[p.marker for p in f.consumed], attempts=f.attempts)
                   for f in state.in_flight.values()],
        chat=[ChatTurnInfo(role=t.role, text=t.text, seq=t.seq, event_id=t.event_id, firing_id=t.firing_id)
              for t in state.chat],
        memory=state.memory,
    )


@router.post("/bots/{bot}/sessions/{session_id}/markers", response_model=Appended, status_code=201,
             responses=ERRORS, tags=["sessions"])
async def add_marker(net: BotNet, session_id: str, body: NewMarker, ctx: Ctx) -> Appended:
    """Add a marker to an exposed location, validated by the location's model."""
    check_session_id(session_id)
    event = inputs.marker_added(net, session_id, body.location, body.data, source="api",
                                request_id=body.request_id)
    await ctx.require_session(net.bot, session_id)
    seq = await ctx.events.append(event)
    return Appended(seq=seq, event=ClientEvent.model_validate(to_client(event, seq)))


@router.post("/bots/{bot}/sessions/{session_id}/messages", response_model=Appended, status_code=201,
             responses=ERRORS, tags=["sessions"])
async def add_message(net: BotNet, session_id: str, body: NewMessage, ctx: Ctx) -> Appended:
    """Say something in the session, as its user."""
    check_session_id(session_id)
    event = inputs.user_message(net, session_id, body.text, request_id=body.request_id)
    await ctx.require_session(net.bot, session_id)
    seq = await ctx.events.append(event)
    return Appended(seq=seq, event=ClientEvent.model_validate(to_client(event, seq)))


@router.delete("/bots/{bot}/sessions/{session_id}", status_code=204, responses=ERRORS,
               tags=["sessions"])
async def delete_session(net: BotNet, session_id: str, ctx: Ctx) -> Response:
    """Delete the session's whole log. It cannot be undone."""
    await ctx.require_session(net.bot, session_id)
    await ctx.events.delete(net.bot, session_id)
    ctx.log.info("session deleted", bot=net.bot, session_id=session_id)
    return Response(status_code=204)
