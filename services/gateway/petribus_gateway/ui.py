"""The web dashboard: one page at ``/`` and its assets under ``/ui/``, every byte shipped in this package
(``dashboard/``: plain ES modules, CSS and SVG drawn at run time; no build step, no CDN), and the two
questions the REST API did not answer: the whole net laid out for drawing (``GET /bots/{bot}/net``, by
``petribus.graph``, unexposed places and transitions included) and the caller's sessions newest first
with their status (``GET /bots/{bot}/recent``). Everything else the page does goes through the public API, with the same
key and owner rules as any client (docs/dashboard.md).

The page itself holds no data, so it is served to anyone; its Content-Security-Policy allows scripts,
styles, images and connections from this origin only (``connect-src`` names this host's ``ws://`` and
``wss://`` for the session stream), and no framing.

A session's status is a fold of its log up to its last event, so it is remembered by (bot, session,
last sequence): a prefix of a log never changes, and a session nobody touched since the last listing
costs one read of its last event.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

from petribus import graph, subjects
from petribus.core import SessionState
from petribus.events import Event, TransitionFailed, decode
from petribus.net import Net
from petribus_gateway import rest
from petribus_gateway.auth import CallerDep, guard
from petribus_gateway.context import GatewayContext, bus_ready, context

DASHBOARD = Path(__file__).parent / "dashboard"
STATUS_MEMO = 10_000  # (bot, session, last seq) -> status answers remembered
HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")

Ctx = Annotated[GatewayContext, Depends(context)]
Status = Literal["idle", "running", "waiting", "failed"]


class RecentSession(BaseModel):
    session_id: str
    events: int = Field(description="Number of events in the session's log.")
    last_seq: int = Field(description="Sequence of its newest event: larger is more recent.")
    updated: float = Field(description="Unix time of its newest event.")
    status: Status = Field(description="waiting: a confirmation, question or file waits for a person; running: "
                           "a firing is in flight; failed: its newest event is a firing that failed for good; "
                           "idle: none of these.")
    forked_from: str | None = Field(default=None, description="The session it was forked from, if any.")


class RecentList(BaseModel):
    bot: str
    sessions: list[RecentSession] = Field(description="Most recently active first.")
    more: int = Field(description="The caller's sessions left out past ``limit``.")


_statuses: OrderedDict[tuple[str, str, int], tuple[Status, str | None]] = OrderedDict()

page = APIRouter(include_in_schema=False)
api = APIRouter(dependencies=[Depends(guard)], tags=["dashboard"])


@page.get("/")
async def index(request: Request) -> FileResponse:
    """The dashboard's page (static: it reads everything through the API with the visitor's key)."""
    host = request.headers.get("host", "")
    ws = f" ws://{host} wss://{host}" if HOST_RE.match(host) else ""
    policy = (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
              f"connect-src 'self'{ws}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return FileResponse(DASHBOARD / "index.html", media_type="text/html", headers={
        "Content-Security-Policy": policy, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"})


@api.get("/bots/{bot}/net", responses=rest.NOT_FOUND)
async def net_layout(net: rest.BotNet) -> dict[str, Any]:
    """The bot's whole net laid out for drawing: every place and transition, exposed or not, with its box,
    and every arc with its points and count (``petribus.graph``'s ``json`` form, as ``petribus graph APP
    --format json`` writes it). ``GET /bots`` lists only the exposed ones."""
    return graph.layout(graph.graph_of(net)).to_json()


@api.get("/bots/{bot}/recent", response_model=RecentList, responses=rest.ERRORS,
         dependencies=[Depends(bus_ready)])
async def recent(net: rest.BotNet, ctx: Ctx, caller: CallerDep,
                 limit: Annotated[int, Query(ge=1, le=200, description="Sessions to answer.")] = 50,
                 ) -> RecentList:
    """The caller's sessions of the bot (as ``GET /bots/{bot}/sessions`` lists them), most recently active
    first, each with its status. By a deployment's name: its sessions on every version, each read from its
    own version's log."""
    listing = await rest.list_sessions(net, ctx, caller)
    newest: list[tuple[int, str, int, Event, Net]] = []
    for s in listing.sessions:
        on = ctx.nets.get(s.bot, net) if s.bot else net
        try:
            msg = await ctx.events.js.get_last_msg(subjects.EVENTS_STREAM, subjects.events(on.bot, s.session_id))
        except NotFoundError:
            continue  # deleted since it was listed
        newest.append((int(msg.seq or 0), s.session_id, s.events, decode(msg.data or b""), on))
    newest.sort(key=lambda found: found[0], reverse=True)
    out = []
    for last_seq, session_id, count, last, on in newest[:limit]:
        status, forked_from = await _status(ctx, on, session_id, last_seq, last)
        out.append(RecentSession(session_id=session_id, events=count, last_seq=last_seq, updated=last.ts,
                                 status=status, forked_from=forked_from))
    return RecentList(bot=listing.bot, sessions=out, more=max(0, len(newest) - limit))


async def _status(ctx: GatewayContext, net: Net, session_id: str, last_seq: int, last: Event
                  ) -> tuple[Status, str | None]:
    key = (net.bot, session_id, last_seq)
    found = _statuses.get(key)
    if found is None:
        state = await ctx.timeline.state_at(net.bot, session_id, last_seq)
        found = (status_of(state, last), state.forked_from[1] if state.forked_from else None)
        _statuses[key] = found
        if len(_statuses) > STATUS_MEMO:
            _statuses.popitem(last=False)
    return found


def status_of(state: SessionState, last_event: Event) -> Status:
    """A session's status from its state and its newest event."""
    if state.pending_requests or state.pending_files or state.awaiting_confirmation():
        return "waiting"
    if state.in_flight:
        return "running"
    if isinstance(last_event, TransitionFailed) and last_event.final:
        return "failed"
    return "idle"


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: the page, its API routes and the assets."""
    app.include_router(page)
    app.include_router(api)
    app.mount("/ui", StaticFiles(directory=DASHBOARD), name="ui")
