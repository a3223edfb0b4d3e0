"""Who is asking, and what they may see: API keys, session owners, and the Origin check (docs/security.md).

**Keys.** A request carries ``Authorization: Bearer <token>``; a browser's WebSocket, which cannot set
headers, sends ``{"type": "auth", "token": ...}`` as its first message instead (never a query
parameter: URLs end up in logs and histories). Tokens are checked against the gateway's in-memory copy
of the ``PB_KEYS`` bucket (``petribus.keys.KeyStore``, a KV watch), so a revoke counts at once. A token
that is sent and is not valid (malformed, unknown, revoked) is always refused with 401, on any route.

**When a key is required.** An authorized bot (``Bot(authorized=True)``, the default) refuses a request
without a key (401) while keys are required: when any live key exists, or when the gateway listens on
a non-loopback address (unless ``PETRIBUS_INSECURE``; ``Gateway.start`` refuses that case outright,
with no keys). A loopback gateway with no keys runs open: local development, everything nobody's. A
public bot (``authorized=False``) takes requests with no key.

**Owners.** A session belongs to the owner of the key that started it (its first event's ``actor``), or
to nobody when it was started without one. A non-admin key sees its owner's sessions only; an admin key
sees every session; a caller without a key sees nobody's sessions where the bot takes requests without a
key (open mode, or a public bot), and only by their id on a public bot while keys are required. Every
other session is answered exactly as one that does not exist: the same 404, on every route (``guard``,
a dependency of every REST router) and the WebSocket (``ws.py``). A key limited to some bots sees the
others as bots that do not exist.

**Origin.** A browser sends ``Origin`` on every WebSocket handshake and state-changing request; one
from a page that is neither the gateway's own origin nor in ``PETRIBUS_ALLOWED_ORIGINS`` is refused
(``OriginCheck``, around the whole app), so another site cannot drive a session through a visitor's
browser. Requests without ``Origin`` (programs, curl) pass: they are not a browser acting for a page.
A gateway running open on loopback also refuses a ``Host`` that is not loopback (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from nats.js.errors import NotFoundError
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from petribus import logs, subjects
from petribus.deploy import split_internal
from petribus.errors import InvalidInput, PetribusError, UnknownBot
from petribus.events import Actor, ErrorEvent, SessionCreated, SessionForked, decode, to_client
from petribus.keys import KeyStore, Principal
from petribus.net import Net
from petribus.settings import Settings
from petribus_gateway.deployments import needs_key, public_names

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CLOSE_POLICY = 1008  # RFC 6455 "Policy Violation": a foreign Origin
CLOSE_UNAUTHORIZED = 4401
AUTH_DEADLINE_S = 5.0  # how long a WebSocket that needs a key and sent no header waits for its auth message
OWNER_CACHE = 100_000  # sessions whose owner is remembered (an owner never changes)
AUTH_TYPE = re.compile(r'"type"\s*:\s*"auth"')
TOKEN_LIKE = re.compile(r"pb_[A-Za-z0-9_-]+")  # a token is pb_<key id>_<secret>, url-safe base64

log = logs.get("petribus.gateway")


class Unauthorized(PetribusError, PermissionError):
    """No valid API key where one is required (HTTP 401)."""

    code = "unauthorized"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's principal (None: no key) and the client's address."""

    principal: Principal | None
    address: str | None

    @property
    def owner(self) -> str | None:
        return self.principal.owner if self.principal is not None else None

    @property
    def admin(self) -> bool:
        return self.principal is not None and self.principal.admin

    def actor(self) -> Actor:
        """What events appended for this caller record (audit): owner, key id, address; never the token."""
        p = self.principal
        return Actor(owner=p.owner if p else None, key_id=p.key_id if p else None, address=self.address)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every interface): reachable from elsewhere, as far as we know


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header value; None for none or another scheme (a proxy's
    Basic credentials are not ours to judge: such a request counts as one without a key)."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def auth_message(text: str) -> str | None:
    """The token of a WebSocket ``{"type": "auth", "token": ...}`` message; None when it is another message.

    Its shape is checked before it is parsed, as every client message's is (``InvalidInput`` ``too_deep``:
    the parser recurses). An auth message that is not valid JSON is refused without being quoted: the
    usual error quotes the start of the message, and here that is the token."""
    from petribus_gateway.inputs import check_shape  # (inputs -> errors -> auth: imported when called)

    if '"auth"' not in text:
        return None
    check_shape(text)
    try:
        payload = json.loads(text)
    except ValueError:
        if AUTH_TYPE.search(text) is None:
            return None  # another broken message that mentions "auth": inputs.parse says what is wrong
        raise InvalidInput("the auth message is not valid JSON (not quoted here: it holds a token); send "
                           "{\"type\": \"auth\", \"token\": \"<token>\"}", code="invalid_json") from None
    if not (isinstance(payload, dict) and payload.get("type") == "auth"):
        return None
    token = payload.get("token")
    return token if isinstance(token, str) else ""


def masked(text: str) -> str:
    """``text`` with anything shaped like a token (``pb_...``) replaced, for log lines and errors that quote
    what a client sent: a token must never reach a log."""
    return TOKEN_LIKE.sub("pb_***", text)


class Auth:
    """The gateway's rules for keys and owners, over its copy of the keys bucket (None: no keys at all)."""

    def __init__(self, settings: Settings, keys: KeyStore | None) -> None:
        self.keys = keys
        self.open_host = is_loopback(settings.host) or settings.insecure
        self._owners: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def required(self) -> bool:
        """Whether an authorized bot needs a key now (any live key, or a host reachable from elsewhere)."""
        return not self.open_host or (self.keys is not None and self.keys.any_live())

    def caller(self, token: str | None, address: str | None) -> Caller:
        """The caller ``token`` speaks for; ``Unauthorized`` for a token sent that is not valid."""
        if token is None:
            return Caller(None, address)
        principal = self.keys.authenticate(token) if self.keys is not None and token else None
        if principal is None:
            raise Unauthorized("the API key sent is not valid: malformed, unknown or revoked. Send "
                               "'Authorization: Bearer <token>' with a token from `petribus keys create`")
        return Caller(principal, address)

    def admit(self, caller: Caller, net: Net) -> None:
        """Refuse a caller without a key on an authorized bot while keys are required (401)."""
        if caller.principal is None and needs_key(net) and self.required():
            raise Unauthorized(f"bot {net.bot!r} needs an API key: send 'Authorization: Bearer <token>' (a "
                               "WebSocket from a browser: {\"type\": \"auth\", \"token\": ...} as its first "
                               "message); an operator makes one with `petribus keys create --owner NAME`")

    def may_use(self, caller: Caller, net: Net) -> bool:
        """Whether the caller may see the bot at all (a key limited to other bots may not)."""
        if caller.principal is not None:
            deployed = split_internal(net.bot)  # a key for a deployment may use each of its versions
            return caller.principal.may_use(net.bot) or (deployed is not None and caller.principal.may_use(deployed[0]))
        return not (needs_key(net) and self.required())

    def net(self, nets: dict[str, Net], bot: str, caller: Caller) -> Net:
        """The bot, as ``UnknownBot`` for a caller whose key may not use it; 401 for one without a key."""
        net = nets.get(bot)
        if net is not None and caller.principal is None:
            self.admit(caller, net)
        if net is None or not self.may_use(caller, net):
            visible = public_names((n.bot for n in nets.values() if self.may_use(caller, n)),
                                   keyed=caller.principal is not None)
            raise UnknownBot(f"unknown bot {bot!r}; this gateway serves {visible} (see GET /bots)")
        return net

    def may_see(self, caller: Caller, net: Net, owner: str | None) -> bool:
        """Whether a session with this owner is the caller's to see and use."""
        if caller.admin:
            return True
        if owner is None:  # nobody's: as open as the bot is to a caller without a key
            return not (needs_key(net) and self.required())
        return owner == caller.owner

    def lists(self, caller: Caller, net: Net, owner: str | None) -> bool:
        """Whether a listing shows this session: the caller's own; nobody's only in open mode (on a public
        bot while keys are required, nobody's sessions are reached by their id alone, as in Beam)."""
        if caller.admin:
            return True
        if owner is None:
            return caller.principal is None and not self.required()
        return owner == caller.owner

    async def owner_of(self, js: Any, bot: str, session_id: str) -> tuple[bool, str | None]:
        """(exists, owner) of a session, from its first event (remembered: it never changes)."""
        key = (bot, session_id)
        if key in self._owners:
            self._owners.move_to_end(key)
            return True, self._owners[key]
        try:
            msg = await js.get_msg(subjects.EVENTS_STREAM, seq=1, subject=subjects.events(bot, session_id), next=True)
        except NotFoundError:
            return False, None
        first = decode(msg.data or b"")
        # As the fold has it (core.apply): only a session_created or session_forked that opens a log names
        # an owner, and the log never drops its first event (discard=new), so the owner never changes.
        opens = isinstance(first, (SessionCreated, SessionForked))
        owner = first.actor.owner if opens and first.actor is not None else None
        self._owners[key] = owner
        if len(self._owners) > OWNER_CACHE:
            self._owners.popitem(last=False)
        return True, owner

    def forget(self, bot: str, session_id: str) -> None:
        self._owners.pop((bot, session_id), None)


def address(conn: HTTPConnection) -> str | None:
    return conn.client.host if conn.client is not None else None


async def guard(request: Request) -> Caller:
    """Dependency of every REST route: the caller, 401 without a valid key where one is needed, and the
    same 404 for a bot or session the caller may not see as for one that does not exist."""
    from petribus_gateway.context import context

    ctx = context(request)
    caller = ctx.auth.caller(bearer(request.headers.get("authorization")), address(request))
    bot = request.path_params.get("bot")
    if bot is not None:
        net = ctx.auth.net(ctx.nets, bot, caller)
        session_id = request.path_params.get("session_id")
        if session_id is not None:
            await ctx.require_visible(net, session_id, caller)
    return caller


CallerDep = Annotated[Caller, Depends(guard)]


async def keyed(caller: CallerDep, request: Request) -> Caller:
    """Dependency of routes about the deployment rather than a bot (``/pools``): a key, where keys are needed."""
    from petribus_gateway.context import context

    if caller.principal is None and context(request).auth.required():
        raise Unauthorized("this route needs an API key while keys are required: send "
                           "'Authorization: Bearer <token>'")
    return caller


# ---------------------------------------------------------------- Origin


def origins(settings: Settings) -> frozenset[str]:
    return frozenset(o.strip().rstrip("/").lower() for o in settings.allowed_origins.split(",") if o.strip())


def origin_allowed(origin: str, scope: Scope, headers: Headers, allowed: frozenset[str]) -> bool:
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    host = headers.get("host")
    return host is not None and origin == f"{scheme}://{host.lower()}"


class OriginCheck:
    """ASGI middleware: refuse a WebSocket handshake or a POST/PUT/PATCH/DELETE whose ``Origin`` is foreign.

    HTTP gets 403 ``{"code": "forbidden_origin"}``; a WebSocket is accepted, sent that error and closed
    with 1008 (a close during the handshake reaches a client as a bare 403 with no reason).

    While the gateway runs open on loopback (no keys: ``loopback_open()``), it also refuses any request
    whose ``Host`` is not a loopback address or an allowed origin's host (``forbidden_host``): that is a
    page on another site that had its name re-pointed at 127.0.0.1 (DNS rebinding), for which the
    gateway's "own origin" would otherwise be the attacker's. ``/healthz`` is exempt (it tells nothing).
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str], loopback_open: Callable[[], bool]) -> None:
        self.app = app
        self.allowed = allowed
        self.allowed_hosts = frozenset(urlsplit(o).netloc for o in allowed)
        self.loopback_open = loopback_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket"):
            headers = Headers(scope=scope)
            host = headers.get("host", "").lower()
            if (self.loopback_open() and scope.get("path") != "/healthz" and not _loopback_authority(host)
                    and host not in self.allowed_hosts):
                await self._refuse(scope, receive, send, "forbidden_host",
                                   f"Host {host[:100]!r} is not this gateway's: a gateway without API keys answers "
                                   "only requests to a loopback address (or PETRIBUS_ALLOWED_ORIGINS)")
                return
            origin = headers.get("origin")
            if ((kind == "websocket" or scope["method"] not in SAFE_METHODS) and origin is not None
                    and not origin_allowed(origin, scope, headers, self.allowed)):
                await self._refuse(scope, receive, send, "forbidden_origin",
                                   f"Origin {origin[:100]!r} may not use this gateway: it is neither the gateway's "
                                   "own origin nor in PETRIBUS_ALLOWED_ORIGINS")
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, code: str, message: str) -> None:
        log.warning("request refused", code=code, path=scope.get("path"), kind=scope["type"])
        if scope["type"] == "http":
            refusal = JSONResponse({"code": code, "message": message}, status_code=403)
            await refusal(scope, receive, send)
            return
        ws = WebSocket(scope, receive, send)
        await ws.accept()
        error = ErrorEvent(bot="", session_id="", code=code, message=message)
        await ws.send_text(json.dumps(to_client(error, None)))
        await ws.close(CLOSE_POLICY, "foreign Origin" if code == "forbidden_origin" else "foreign Host")


def _loopback_authority(host: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6]:port``) names a loopback address."""
    name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.partition(":")[0]
    return is_loopback(name)
