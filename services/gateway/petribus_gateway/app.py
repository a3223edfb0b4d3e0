"""The gateway service: FastAPI (WebSocket sessions and the REST API) served by uvicorn in-process.

``Gateway.start()`` connects to NATS, binds its socket (``port=0`` picks a free one; ``url`` tells which)
and serves until ``stop()``, which closes every WebSocket (code 1012) and waits for its handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any

import uvicorn
from fastapi import FastAPI

import petribus
from petribus.deletion import GuardedEventLog, Tombstones
from petribus.errors import PetribusError
from petribus.keys import KeyStore
from petribus.net import Net
from petribus.service import Service
from petribus.settings import Settings
from petribus_gateway import auth, docs, errors, files, limits, metrics_route, pools, rest, ui, ws
from petribus_gateway.context import GatewayContext

DESCRIPTION = """\
Chat with petribus bots and inspect their sessions. Every session is one event log; everything here
is read from it.

**WebSocket** `ws://HOST/bots/{bot}/ws` starts a session: its first message is `session_created`
(value: the session id). `?session_id=ID&since=SEQ` follows an existing session from after `SEQ` (the
`metadata.seq` of the last event you received): nothing is lost or repeated across reconnects. Events
arrive as `{"type", "value", "metadata": {session_id, request_id, task_id, transition_name, seq}}`.

Send `{"type": "user_message", "value": "..."}` or
`{"type": "marker_added", "value": {"location": "UserName", "data": {"name": "alice"}}}` (optionally
with a `request_id`). A message that does not validate gets an `error` event, to you only; nothing
enters the log and the connection stays open. Close codes: 4404 unknown bot or session, 4400 bad
query, 4401 no valid API key, 1008 a foreign Origin, 1011 event stream lost (reconnect with `since`),
1012 gateway restarting, 1013 the session log is unavailable (connect again shortly).

**Retrying safely.** While the session log (NATS) is unavailable (a restart, a cluster fail-over),
REST answers 503 with `Retry-After` and `{"code": "bus_unavailable"}`, and a WebSocket message gets an
`error` event with that code and your `request_id`. Send it again with the same key: the
`Idempotency-Key` header on a REST POST, the `request_id` (1-128 printable ASCII characters, unique
per message in a session) on the WebSocket. A key names one request in one session: a retry lands
once, and a REST retry of one that had landed gets the first answer back (same `seq`, same event)
with `Idempotent-Replayed: true`. A different request under a used key gets 409
`idempotency_key_reused`; a malformed key 400.

**Human in the loop.** A `confirm=True` transition sends `confirm_transition` (`metadata.task_id`, the
transition, the markers it would consume); answer `{"type": "accept_transition", "value": TASK_ID}` or
`{"type": "reject_transition", "value": TASK_ID}` (rejected markers go back and are not offered to that
transition again; unanswered ones are rejected after `PETRIBUS_CONFIRM_TIMEOUT_S`). A running
transition's `confirm_request` is answered with
`{"type": "confirm_response", "value": {"request_id": ID, "accepted": true}}`. An unknown or already
answered id gets an `error` event. REST: `POST .../confirmations/{task_id}` and
`POST .../confirm_requests/{request_id}` with `{"accepted": true|false}` (404 unknown, 409 answered).

**Files.** `output_file` carries a `url` to GET; `input_file_request` an `upload_url` to PUT the bytes
to (or POST multipart).

**API keys and owners** (docs/security.md). Send `Authorization: Bearer <token>` (a token from
`petribus keys create`); a browser's WebSocket sends `{"type": "auth", "token": "..."}` as its first
message instead. A bot that needs a key answers 401 without one (WebSocket: close code 4401). A session
belongs to the owner of the key that started it: listings show your sessions (an admin key: all), and
another owner's session is answered as one that does not exist (404; WebSocket 4404). Every event a
request appended records who caused it in `metadata.actor` (owner, key id, address; never the token).
A browser page from another origin than the gateway's own or `PETRIBUS_ALLOWED_ORIGINS` is refused
(403; WebSocket close 1008).
"""

GRACEFUL_SHUTDOWN_S = 5


def create_app(ctx: GatewayContext, *, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app over ``ctx``. ``on_ready`` runs at startup, once the app can take requests."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="petribus gateway", version=petribus.__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # docs.install serves them offline
    app.state.gateway = ctx
    app.include_router(rest.router)
    app.include_router(files.router)
    app.include_router(pools.router)
    app.include_router(ws.router)
    ui.install(app)  # the dashboard: / and /ui/ (docs/dashboard.md)
    metrics_route.install(app, frozenset(ctx.nets))  # /metrics, WebSocket clients (docs/metrics.md)
    docs.install(app)
    errors.install(app)
    loopback_open = auth.is_loopback(ctx.settings.host)
    app.add_middleware(limits.Limits, ctx=ctx)  # sizes, rates, quotas (docs/limits.md); inside the Origin check
    app.add_middleware(auth.OriginCheck, allowed=auth.origins(ctx.settings),
                       loopback_open=lambda: loopback_open and not ctx.auth.required())
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals belong to Service.run(), which stops the gateway (and so this server) on SIGTERM.
        yield


class Gateway(Service):
    name = "gateway"

    def __init__(self, settings: Settings, nets: Iterable[Net]) -> None:
        super().__init__(settings)
        self.nets = {n.bot: n for n in nets}
        self.url = ""
        self.app: FastAPI | None = None
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.keys: KeyStore | None = None
        self.deployments = False  # run what is deployed (``--deployments``): petribus_gateway.deployments
        self._closers: list[Callable[[], Awaitable[None]]] = []  # watches (tombstones, deployments), closed at stop

    def add_net(self, net: Net) -> None:
        """Serve ``net`` too, from now on (a deployed version loaded while running)."""
        self.nets[net.bot] = net

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(timeout=GRACEFUL_SHUTDOWN_S)  # don't leave a half-started gateway behind
            raise

    async def _start(self) -> None:
        nc = await self.connect()
        self.keys = KeyStore(nc, replicas=self.settings.replicas)
        await self.keys.start()
        self._check_exposure(self.keys)
        ready = asyncio.Event()
        outage_s = min(self.settings.bus_outage_s, errors.REQUEST_OUTAGE_S)
        # A deleted session stays deleted: a message sent on a socket opened before its deletion, or any
        # other append for it, is refused (answered as for a session that does not exist).
        tombstones = Tombstones(nc)
        await tombstones.start()
        self._closers.append(tombstones.close)
        events = GuardedEventLog(nc, outage_s=outage_s, tombstones=tombstones)
        ctx = GatewayContext(self.settings, self.nets, nc, events, outage_s=outage_s, keys=self.keys)
        self.app = create_app(ctx, on_ready=ready.set)
        if self.deployments:
            await self._follow_deployments(nc)
        sock = _listen(self.settings.host, self.settings.port)
        self.url = f"http://{_url_host(self.settings.host)}:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="on",
            # The transport's hard limit; the app refuses smaller oversized messages with an error event.
            ws_max_size=max(16 * 1024 * 1024, 4 * self.settings.gateway_max_message_bytes),
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = _Server(config)
        self._serving = self.spawn(self._serve(sock), "http")
        started = asyncio.create_task(ready.wait())
        await asyncio.wait({started, self._serving}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            exc = self._serving.exception() if not self._serving.cancelled() else None
            raise exc or PetribusError(f"the gateway stopped while starting on {self.url}",
                                       code="gateway_start")
        self.log.info("gateway listening", url=self.url, bots=sorted(self.nets), keys_required=ctx.auth.required())

    async def _follow_deployments(self, nc: Any) -> None:
        from petribus.deployed import Reports, follow
        from petribus.registry import Registry

        from petribus_gateway.deployments import DeploymentRoutes, Routing

        deployed = await follow(nc, role="gateway", instance=f"gateway@{socket.gethostname()}:{os.getpid()}",
                                data_dir=self.settings.data_dir, add_net=self.add_net,
                                replicas=self.settings.replicas)
        reports = Reports(nc, replicas=self.settings.replicas)
        await reports.start()
        registry = await Registry(nc.jetstream(), heartbeat_s=self.settings.registry_heartbeat_s,
                                  replicas=self.settings.replicas).watch()
        self._closers += [deployed.close, reports.close, registry.stop]
        assert self.app is not None
        self.app.add_middleware(DeploymentRoutes, routing=Routing(nc.jetstream(), deployed.catalog, reports,
                                                                  registry, self.nets))

    def _check_exposure(self, keys: KeyStore) -> None:
        """Refuse to listen where other machines reach the gateway while no key exists: every session of
        every bot would be open to whoever connects."""
        host = self.settings.host
        if auth.is_loopback(host) or self.settings.insecure or keys.any_live():
            return
        raise PetribusError(
            f"refusing to listen on {host or 'every interface'}: that address is reachable from other machines "
            "and no API key exists, so anyone who connects could read and drive every session. Make a key "
            "first (petribus keys create --owner NAME --nats-url URL), listen on 127.0.0.1, or pass --insecure "
            "(PETRIBUS_INSECURE=1) to run without keys on purpose (docs/security.md)",
            code="gateway_insecure")

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            await self._server.serve(sockets=[sock])
        except SystemExit:  # uvicorn's way of saying startup failed; it already logged why
            raise PetribusError(f"the gateway's HTTP server failed to start on {self.url}",
                                code="gateway_start") from None
        finally:
            sock.close()

    async def drain(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._serving is not None and not self._serving.done():
            await asyncio.wait({self._serving})
        if self.keys is not None:
            await self.keys.close()
        for close in self._closers:
            await close()


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket: the port is known (even for port 0) before the server starts."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise PetribusError(
            f"the gateway cannot listen on {host}:{port} ({exc}); "
            "choose another address with PETRIBUS_HOST / PETRIBUS_PORT",
            code="gateway_listen",
        ) from exc
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def run(settings: Settings, nets: Iterable[Net]) -> None:
    await Gateway(settings, nets).run()
