"""``GET /metrics``: the process's Prometheus metrics (``petribus.metrics``), and the WebSocket client count.

Who may scrape (docs/metrics.md, docs/security.md): while the gateway runs open (loopback, no keys)
anyone who reaches it, like every other route; while keys are required, an admin key only
(``Authorization: Bearer``; Prometheus' ``authorization: {credentials_file: ...}``). The metrics name
every bot and transition of the deployment, which a key limited to some bots must not learn. A
scraper that should not hold a key scrapes ``PETRIBUS_METRICS_PORT`` instead, on a network only it
reaches.

``ClientCount`` counts a WebSocket from its accept to the end of its handler, by bot (a bot the gateway
does not serve is not counted: the label stays bounded).
"""

from __future__ import annotations

import re

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from petribus import metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from petribus_gateway.auth import Unauthorized, address, bearer
from petribus_gateway.context import context
from petribus_gateway.models import ErrorBody

SOCKET_PATH = re.compile(r"^/bots/([^/]+)/ws$")

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def scrape(request: Request) -> Response:
    ctx = context(request)
    caller = ctx.auth.caller(bearer(request.headers.get("authorization")), address(request))
    if ctx.auth.required() and not caller.admin:
        if caller.principal is None:
            raise Unauthorized("/metrics needs an admin API key while keys are required: send "
                               "'Authorization: Bearer <token>' with a key made by `petribus keys create "
                               "--admin`, or scrape PETRIBUS_METRICS_PORT (docs/metrics.md)")
        body = ErrorBody(code="forbidden", message="/metrics needs an admin key: it names every bot and "
                         "transition of this deployment; use a key made with `petribus keys create --admin`")
        return JSONResponse(body.model_dump(), status_code=403)
    return Response(await metrics.render(), media_type=metrics.CONTENT_TYPE)


class ClientCount:
    """ASGI middleware: ``petribus_websocket_clients{bot}`` up at accept, down when the socket's handler
    ends."""

    def __init__(self, app: ASGIApp, bots: frozenset[str]) -> None:
        self.app = app
        self.bots = bots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = SOCKET_PATH.match(scope.get("path", "")) if scope["type"] == "websocket" else None
        if found is None or found.group(1) not in self.bots:
            await self.app(scope, receive, send)
            return
        gauge = metrics.WEBSOCKET_CLIENTS.labels(found.group(1))
        accepted = False

        async def counted(message: Message) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                gauge.inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            if accepted:
                gauge.dec()


def install(app: FastAPI, bots: frozenset[str]) -> None:
    app.include_router(router)
    app.add_middleware(ClientCount, bots=bots)
