"""Run every service in this process (executor workers are still separate processes), for tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import websockets

from petribus.bus import EventLog
from petribus.core import SessionState, fold
from petribus.loader import load_net
from petribus.settings import Settings


class Stack:
    """Scheduler, executor, LLM service and gateway for ``apps`` against one NATS server.

    ``parts`` picks which services to start (all by default).
    """

    def __init__(self, settings: Settings, apps: Sequence[str],
                 parts: Sequence[str] = ("scheduler", "executor", "llm", "gateway")) -> None:
        self.settings = settings
        self.apps = list(apps)
        self.nets = [load_net(a) for a in self.apps]
        self.parts = parts
        self.services: dict[str, Any] = {}

    async def __aenter__(self) -> "Stack":
        # Each service is imported only when asked for, so a stack of some parts needs only those.
        def scheduler() -> Any:
            from petribus_scheduler.app import Scheduler
            return Scheduler(self.settings, self.nets)

        def executor() -> Any:
            from petribus_executor.app import Executor
            return Executor(self.settings, self.apps)

        def llm() -> Any:
            from petribus_llm.app import LLMService
            return LLMService(self.settings, self.nets)

        def gateway() -> Any:
            from petribus_gateway.app import Gateway
            return Gateway(self.settings, self.nets)

        makers = {"scheduler": scheduler, "executor": executor, "llm": llm, "gateway": gateway}
        for part in self.parts:
            svc = makers[part]()
            await svc.start()
            self.services[part] = svc
        return self

    async def __aexit__(self, *exc: object) -> None:
        for part in reversed(list(self.services)):
            await self.services[part].stop(timeout=5.0)

    @property
    def gateway(self) -> Any:
        return self.services["gateway"]

    def ws_url(self, bot: str, **params: Any) -> str:
        base = self.gateway.url.replace("http://", "ws://")
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        return f"{base}/bots/{bot}/ws" + (f"?{query}" if query else "")


class Client:
    """A WebSocket client that records every event it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str) -> "Client":
        return cls(await websockets.connect(url, max_size=None))

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        ev = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(ev)
        return ev

    async def until(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Receive until an event matches ``pred`` (a type name or a predicate); return it."""
        check = (lambda e: e["type"] == pred) if isinstance(pred, str) else pred
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.recv(timeout)
                if check(ev):
                    return ev

    async def close(self) -> None:
        await self.ws.close()


async def session_state(nc: Any, bot: str, session_id: str) -> tuple[SessionState, list]:
    events = await EventLog(nc).read(bot, session_id)
    return fold(events), events
