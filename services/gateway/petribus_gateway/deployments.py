"""The gateway under ``--deployments``: which version a request goes to.

Every deployed version is loaded here as its own bot, ``<name>--<version>`` (``petribus.deployed``). Callers
name the deployment, not the version:

- ``/bots/{name}/...`` means the default environment (``petribus.deploy.DEFAULT_ENV``);
  ``/envs/{env}/bots/{name}/...`` another one. The path is rewritten to the version's own bot before
  routing, so every route, the WebSocket and the files work as they do for a plain bot; so does naming a
  version directly (``/bots/{name}--{version}/...``).
- **A new session** (``POST /bots/{name}/sessions``, a WebSocket without ``session_id``) goes to the
  environment's active version once it is ready (``petribus.deployed.readiness``). Until then it goes to
  the version active before it that is ready (blue-green), and when none is: 503 ``version_not_ready``
  saying what it waits for, or, for a version a service could not load, why.
- **An existing session** (a path with its id, or ``?session_id=``) stays on the version it started on,
  whatever is active now: the version is read from the session's own subjects, once, and remembered.
- A **deactivated** deployment refuses new sessions with 409 ``deployment_deactivated`` (WebSocket close
  4409); its existing sessions run on to their end. ``petribus activate`` or ``rollback`` undo it.
- The environment's policy ``authorized`` (when set) is the bot's ``authorized`` in that environment.
- ``GET /bots/{name}`` describes the version a new session would get (``Routing.shown``);
  ``GET /bots/{name}/sessions`` lists the caller's sessions of every version loaded here, each with its
  version's bot.
- ``GET /bots`` (the default environment) and ``GET /envs/{env}/bots`` list each deployment of that
  environment once, by its name, described as ``GET /bots/{name}`` describes it, and under the
  environment's key policy: where it needs a key, a caller without one does not see it (as an authorized
  plain bot). A version's own bot name is never listed; plain bots are listed in the default environment,
  as without deployments.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from petribus import subjects
from petribus.deploy import DEFAULT_ENV, Catalog, Deployment, split_internal
from petribus.deployed import Reports, readiness
from petribus.errors import PetribusError
from petribus.events import ErrorEvent, to_client
from petribus.registry import RegistryView
from petribus_gateway import reasons

ROUTED = re.compile(r"^(?:/envs/(?P<env>[^/]+))?/bots/(?P<name>[^/]+)(?P<rest>(?:/.*)?)$")
LISTING = re.compile(r"^(?:/envs/(?P<env>[^/]+))?/bots/?$")
DESCRIBED = ("", "/net")  # GETs that describe a deployment rather than start or read a session
SESSION = re.compile(r"^/sessions/(?P<sid>[^/]+)")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # what a session id may be (context.check_session_id)
CLOSE_DEACTIVATED = 4409
CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN = 1013
SESSIONS_REMEMBERED = 100_000
# Set by the middleware for the request it routes (the route runs in the same task, so sees them).
ENV: ContextVar[str | None] = ContextVar("petribus_env", default=None)
AUTHORIZED: ContextVar[bool | None] = ContextVar("petribus_authorized", default=None)
DEPLOYMENT: ContextVar[str | None] = ContextVar("petribus_deployment", default=None)
ROUTING: ContextVar[Routing | None] = ContextVar("petribus_routing", default=None)


@dataclass(frozen=True)
class Listed:
    """A deployment as a listing shows it: by its name, described by the version ``bot``."""

    name: str
    bot: str
    version: str
    deactivated: bool
    authorized: bool | None  # the environment's key policy (None: the bot's own)


def current_deployment() -> str | None:
    """The deployment name the request being served was addressed by (None: a bot or version by name)."""
    return DEPLOYMENT.get()


def deployment_of(bot: str) -> str | None:
    """The deployment a version's bot belongs to (None: not a deployed version)."""
    named = split_internal(bot)
    return None if named is None else named[0]


def needs_key(net: Any) -> bool:
    """Whether callers of ``net`` need an API key here: the environment's policy when it sets one (a
    request routed by deployment), else the bot's own ``authorized``."""
    policy = AUTHORIZED.get()
    return net.authorized if policy is None else policy


def current_env() -> str | None:
    """The environment of the request being served (None: not routed by deployment)."""
    return ENV.get()


def listing() -> list[Listed] | None:
    """The deployments ``GET /bots`` lists for the request being served (its environment's); None when the
    gateway does not run deployments."""
    routing = ROUTING.get()
    return None if routing is None else routing.listing(ENV.get() or DEFAULT_ENV)


def public_names(bots: Iterable[str], *, keyed: bool = True) -> list[str]:
    """The names a caller may use for ``bots``: a plain bot's own; a deployment's (of the request's
    environment) instead of its versions' internal ones, if its version is among ``bots`` and, when the
    environment asks for a key, the caller has one (``keyed``)."""
    bots = set(bots)
    names = {bot for bot in bots if split_internal(bot) is None}
    names.update(each.name for each in listing() or []
                 if each.bot in bots and (keyed or not each.authorized))
    return sorted(names)


def described(bot: str) -> tuple[str, str | None, bool]:
    """How ``bot`` is named when described: (name, version, deactivated). A version is named by its
    deployment; deactivated only as seen from the environment the request was routed through."""
    named = split_internal(bot)
    if named is None:
        return bot, None, False
    routing, env = ROUTING.get(), ENV.get()
    dep = None if routing is None or env is None else routing.catalog.deployments().get((env, named[0]))
    return named[0], named[1], dep is not None and dep.state != "active"


@contextmanager
def policy(authorized: bool | None) -> Iterator[None]:
    """Judge keys (``needs_key``) under an environment's ``authorized`` policy, as a request routed through
    that environment is judged."""
    token = AUTHORIZED.set(authorized)
    try:
        yield
    finally:
        AUTHORIZED.reset(token)


class Routing:
    """Which internal bot serves a deployment's new sessions in an environment, and which one an existing
    session is on."""

    def __init__(self, js: JetStreamContext, catalog: Catalog, reports: Reports, registry: RegistryView,
                 served: dict[str, Any]) -> None:
        self.js = js
        self.catalog = catalog
        self.reports = reports
        self.registry = registry
        self.served = served  # the gateway's nets by bot: the versions loaded here
        self.sessions: OrderedDict[tuple[str, str], str] = OrderedDict()  # (name, session) -> bot

    def deployment(self, env: str, name: str) -> Deployment:
        dep = self.catalog.deployments().get((env, name))
        if dep is None or dep.active is None:
            where = sorted(n for (e, n) in self.catalog.deployments() if e == env)
            raise PetribusError(f"no deployment {name!r} in environment {env!r} (there: {where}); deploy it "
                                f"with `petribus deploy APP --name {name} --env {env}`", code="unknown_bot")
        return dep

    def for_new(self, env: str, name: str) -> str:
        """The bot a new session of ``name`` in ``env`` goes to."""
        dep = self.deployment(env, name)
        if dep.state != "active":
            raise PetribusError(f"deployment {name!r} is deactivated in environment {env!r}: it takes no new "
                                f"sessions (existing ones run on); `petribus activate {name} --env {env}` "
                                "undoes it", code="deployment_deactivated")
        why = ""
        for version in self._candidates(dep):
            ok, reason = self.ready(version)
            if ok:
                return self.catalog.versions()[version].bot
            why = why or f"version {version}: {reason}"
        raise PetribusError(f"no version of {name!r} in {env!r} is ready for new sessions yet ({why}); try "
                            "again shortly", code="version_not_ready")

    def shown(self, env: str, name: str) -> str | None:
        """The bot that describes ``name`` in ``env``: the version a new session gets (``for_new``), else,
        deactivated or with none ready, the newest of those that would get one that is loaded here (the
        active version first); None when this gateway has loaded none of them."""
        dep = self.catalog.deployments().get((env, name))
        if dep is None or dep.active is None:
            return None
        versions = self.catalog.versions()
        candidates = [v for v in self._candidates(dep) if v in versions and versions[v].bot in self.served]
        if dep.state == "active":
            for version in candidates:
                if self.ready(version)[0]:
                    return versions[version].bot
        return versions[candidates[0]].bot if candidates else None

    def describe(self, env: str, name: str) -> str:
        """``shown``, refused as ``unknown_bot`` or ``version_not_ready`` when there is nothing to show."""
        dep = self.deployment(env, name)
        bot = self.shown(env, name)
        if bot is None:
            raise PetribusError(f"no version of {name!r} in {env!r} is loaded by this gateway yet (active: "
                                f"{dep.active}); try again shortly", code="version_not_ready")
        return bot

    def listing(self, env: str) -> list[Listed]:
        """Each deployment of ``env`` once, by name, as ``shown`` describes it. In the default environment
        a plain bot of the same name is what ``/bots/{name}`` reaches, so the deployment is left out."""
        out = []
        for (where, name), dep in sorted(self.catalog.deployments().items()):
            if where != env or (env == DEFAULT_ENV and name in self.served):
                continue
            bot = self.shown(env, name)
            named = None if bot is None else split_internal(bot)
            if bot is not None and named is not None:
                out.append(Listed(name=name, bot=bot, version=named[1], deactivated=dep.state != "active",
                                  authorized=dep.policies.authorized))
        return out

    def _candidates(self, dep: Deployment) -> list[str]:
        """The active version, then those active before it, newest first (each once)."""
        seen: list[str] = [dep.active] if dep.active else []
        for entry in reversed(dep.history):
            if entry.version and entry.version not in seen and entry.action in ("deploy", "release", "rollback"):
                seen.append(entry.version)
        return seen

    def ready(self, version: str) -> tuple[bool, str]:
        record = self.catalog.versions().get(version)
        if record is None:
            return False, "its record is not here yet"
        ok, why = readiness(record, self.reports.of(version), self.registry.executors())
        if ok and record.bot not in self.served:
            return False, "waiting for this gateway to load it"
        return ok, why

    async def of_session(self, name: str, session_id: str) -> str | None:
        """The bot (version) an existing session of ``name`` is on; None when there is no such session."""
        key = (name, session_id)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        try:
            info = await self.js.stream_info(subjects.EVENTS_STREAM,
                                             subjects_filter=subjects.event("*", session_id, "*"))
        except NotFoundError:
            return None
        for subject in (info.state.subjects or {}):
            bot, _ = subjects.parse_events(subject)
            if (split_internal(bot) or ("", ""))[0] == name:
                self.sessions[key] = bot
                while len(self.sessions) > SESSIONS_REMEMBERED:
                    self.sessions.popitem(last=False)
                return bot
        return None

    def closed_somewhere(self, bot: str) -> bool:
        """Whether an environment whose policy needs a key has version ``bot`` active or had it before."""
        named = split_internal(bot)
        if named is None:
            return False
        return any(dep.policies.authorized and (dep.active == named[1] or any(
                   e.version == named[1] for e in dep.history))
                   for (_, name), dep in self.catalog.deployments().items() if name == named[0])

    def authorized(self, env: str, name: str) -> bool | None:
        dep = self.catalog.deployments().get((env, name))
        return None if dep is None else dep.policies.authorized


class DeploymentRoutes:
    """ASGI middleware: rewrites ``[/envs/{env}]/bots/{name}/...`` to the version's own bot (see above)."""

    def __init__(self, app: Any, routing: Routing) -> None:
        self.app = app
        self.routing = routing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        routing = ROUTING.set(self.routing)
        try:
            return await self._route(scope, receive, send)
        finally:
            ROUTING.reset(routing)

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        listed = LISTING.match(scope["path"])
        if listed is not None:  # GET [/envs/{env}]/bots: the route lists the environment's deployments
            scope = {**scope, "path": "/bots", "raw_path": b"/bots"}
            token = ENV.set(listed["env"] or DEFAULT_ENV)
            try:
                return await self.app(scope, receive, send)
            finally:
                ENV.reset(token)
        match = ROUTED.match(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        env, name, rest = match["env"], match["name"], match["rest"]
        if env is None and (name in self.routing.served or split_internal(name) is not None):
            # A version named directly (or a plain bot): no environment, so the strictest key policy of
            # the environments that run it holds (naming the version never opens what an env closes).
            token = AUTHORIZED.set(True if self.routing.closed_somewhere(name) else None)
            try:
                return await self.app(scope, receive, send)
            finally:
                AUTHORIZED.reset(token)
        env = env or DEFAULT_ENV
        try:
            bot = await self._bot(scope, env, name, rest)
        except PetribusError as exc:
            return await _refuse(scope, receive, send, exc)
        path = f"/bots/{bot}{rest}"
        scope = {**scope, "path": path, "raw_path": path.encode()}
        tokens = ENV.set(env), AUTHORIZED.set(self.routing.authorized(env, name)), DEPLOYMENT.set(name)
        try:
            return await self.app(scope, receive, send)
        finally:
            ENV.reset(tokens[0])
            AUTHORIZED.reset(tokens[1])
            DEPLOYMENT.reset(tokens[2])

    async def _bot(self, scope: dict[str, Any], env: str, name: str, rest: str) -> str:
        session = SESSION.match(rest)
        session_id = session["sid"] if session else _query(scope).get("session_id")
        if session_id and not SESSION_ID_RE.match(session_id):
            session_id = None  # not an id (a wildcard, say): not looked up; the route refuses it (422)
        if session_id:
            self.routing.deployment(env, name)  # the deployment exists there
            bot = await self.routing.of_session(name, session_id)
            if bot is not None:
                return bot
            # No such session: the active version answers it (404, as for any unknown session).
            return self.routing.catalog.versions()[self.routing.deployment(env, name).active].bot
        reading = scope["type"] == "http" and scope.get("method") in ("GET", "HEAD")
        if reading and rest in DESCRIBED:
            return self.routing.describe(env, name)
        if session or (reading and rest.startswith(("/sessions", "/recent"))):
            return self.routing.catalog.versions()[self.routing.deployment(env, name).active].bot
        return self.routing.for_new(env, name)


def _query(scope: dict[str, Any]) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl((scope.get("query_string") or b"").decode()))


STATUS = {"unknown_bot": 404, "deployment_deactivated": 409, "version_not_ready": 503}
CLOSE = {"unknown_bot": CLOSE_NOT_FOUND, "deployment_deactivated": CLOSE_DEACTIVATED,
         "version_not_ready": CLOSE_TRY_AGAIN}


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, exc: PetribusError) -> None:
    body = {"code": exc.code, "message": exc.message}
    if scope["type"] == "http":
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if exc.code == "version_not_ready":
            headers.append((b"retry-after", b"2"))
        await send({"type": "http.response.start", "status": STATUS.get(exc.code, 400), "headers": headers})
        await send({"type": "http.response.body", "body": data})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})  # then refuse: a close in the handshake is a bare 403
    error = ErrorEvent(bot=_bot_of(scope), session_id="", code=exc.code, message=exc.message)
    await send({"type": "websocket.send", "text": json.dumps(to_client(error, None))})  # the shape of every event
    await send({"type": "websocket.close", "code": CLOSE.get(exc.code, 4400),
                "reason": reasons.close_reason(exc.message, exc.code)})


def _bot_of(scope: dict[str, Any]) -> str:
    routed = ROUTED.match(scope.get("path", ""))
    return routed["name"] if routed else ""
