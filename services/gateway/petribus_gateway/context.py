"""What every gateway handler needs: the nets it serves and the log, plus the look-ups that 404.

Sessions have no index of their own: a session exists while its subject holds events, so every
question about one is asked of the log.

``bus_ready`` is the gate in front of every request that touches the log: while the connection to
NATS is down it waits for it to come back (the connection's reconnect hook, not a poll) for at most
``outage_s``, then refuses with ``bus_unavailable`` (503 + Retry-After), so a client learns to retry
in bounded time instead of waiting out request timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from starlette.requests import HTTPConnection

from petribus import logs
from petribus.bus import EventLog
from petribus.errors import BusUnavailable, InvalidInput, UnknownBot, UnknownSession
from petribus.events import Actor, AgentMessage, SessionCreated, _Event, new_id
from petribus.files import FileStore
from petribus.keys import KeyStore
from petribus.net import Net, check_handoffs
from petribus.outage import on_disconnect, on_reconnect
from petribus.settings import Settings
from petribus_gateway.auth import Auth, Caller
from petribus_gateway.deployments import SESSION_ID_RE, current_env, public_names
from petribus_gateway.timeline import Timeline

# A session id is one subject token: no '.', and no '*' or '>' that would widen a read or a purge.


@dataclass
class GatewayContext:
    settings: Settings
    nets: dict[str, Net]
    nc: NATS
    events: EventLog
    outage_s: float = 10.0  # how long a request waits for a lost connection to come back
    keys: KeyStore | None = None  # the API keys (None: this gateway knows of none)
    log: Any = field(init=False)
    auth: Auth = field(init=False)
    files: FileStore = field(init=False)
    timeline: Timeline = field(init=False)
    # What admits a new session (rate, storage, the owner's quota), or raises ``limits.Refused``: set by
    # the limits middleware, which applies it to REST creations and forks itself; a WebSocket calls
    # ``admit_session`` once its caller is known (its key may come in its first message).
    session_gate: Callable[[Caller], Awaitable[None]] | None = field(default=None, init=False)
    _connected: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        check_handoffs(self.nets.values())  # a hand-off to a bot not served here: refused at start
        self.log = logs.get("petribus.gateway")
        self.files = FileStore(self.events.js, self.settings.max_file_bytes)
        self.timeline = Timeline(self.events)
        self.auth = Auth(self.settings, self.keys)
        self._connected = asyncio.Event()
        if self.nc.is_connected:
            self._connected.set()
        on_reconnect(self.nc, self._up)
        on_disconnect(self.nc, self._down)

    async def _up(self) -> None:
        self._connected.set()

    async def _down(self) -> None:
        self._connected.clear()

    async def admit_session(self, caller: Caller) -> None:
        """Let ``caller`` start one more session, or raise ``limits.Refused`` (see ``session_gate``)."""
        if self.session_gate is not None:
            await self.session_gate(caller)

    async def bus_ready(self) -> None:
        """Return once NATS is connected; ``BusUnavailable`` when it is not back within ``outage_s``."""
        if self.nc.is_connected:
            return
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self._connected.wait(), self.outage_s)
                return
            except TimeoutError:
                pass
        raise BusUnavailable(f"the gateway's connection to NATS has been down for over {self.outage_s:g}s")

    def net(self, bot: str) -> Net:
        net = self.nets.get(bot)
        if net is None:
            raise UnknownBot(f"unknown bot {bot!r}; this gateway serves {public_names(self.nets)} (see GET /bots)")
        return net

    async def require_session(self, bot: str, session_id: str) -> int:
        """The session's last sequence; ``UnknownSession`` when its subject holds no events."""
        check_session_id(session_id)
        await self.bus_ready()
        last = await self.events.last_seq(bot, session_id)
        if last == 0:
            raise unknown_session(bot, session_id)
        return last

    async def require_visible(self, net: Net, session_id: str, caller: Caller) -> None:
        """``UnknownSession`` for a session that does not exist or that ``caller`` may not see: the same
        answer, so that another owner's session ids cannot be told from ids that were never used."""
        check_session_id(session_id)
        await self.bus_ready()
        exists, owner = await self.auth.owner_of(self.events.js, net.bot, session_id)
        if not exists or not self.auth.may_see(caller, net, owner):
            raise unknown_session(net.bot, session_id)

    async def create_session(self, net: Net, actor: Actor | None = None) -> tuple[str, int]:
        """Start a session: ``session_created`` (its ``actor`` owns the session) first, then the bot's
        welcome message if it has one."""
        await self.bus_ready()
        session_id = new_id()
        # Through a deployment, the environment it was started in (its policies apply to it).
        opening: list[_Event] = [SessionCreated(bot=net.bot, session_id=session_id, actor=actor,
                                                env=current_env())]
        ids = [f"session:{session_id}"]
        if net.welcome_message:
            opening.append(AgentMessage(bot=net.bot, session_id=session_id, text=net.welcome_message,
                                        cause=opening[0].id))
            ids.append(f"welcome:{session_id}")
        seqs = await self.events.append_many(opening, msg_ids=ids)
        self.log.info("session created", bot=net.bot, session_id=session_id, seq=seqs[0],
                      owner=actor.owner if actor is not None else None)
        return session_id, seqs[0]


def unknown_session(bot: str, session_id: str) -> UnknownSession:
    return UnknownSession(
        f"unknown session {session_id!r} of bot {bot!r}: it never existed or was deleted; "
        f"list sessions with GET /bots/{bot}/sessions or connect without session_id to start one"
    )


def check_session_id(session_id: str) -> None:
    if not SESSION_ID_RE.match(session_id):
        raise InvalidInput(
            f"session id {session_id[:140]!r} is not valid: use 1-128 letters, digits, '_' or '-' "
            "(the id a session_created event gave you)",
            code="invalid_session_id",
        )


def context(conn: HTTPConnection) -> GatewayContext:
    """FastAPI dependency: the context the app was made with (HTTP routes and WebSockets alike)."""
    return conn.app.state.gateway  # type: ignore[no-any-return]


async def bus_ready(conn: HTTPConnection) -> None:
    """FastAPI dependency of every route that touches the log: see ``GatewayContext.bus_ready``."""
    await context(conn).bus_ready()
