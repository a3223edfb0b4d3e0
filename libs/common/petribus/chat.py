"""A chat in the terminal: a WebSocket client of the gateway, one line per event, like a Beam session.

Lines typed (or piped) in become ``user_message``s; ``/add LOCATION {json}`` is sent as a user message
too, so the LLM service turns it into a validated marker and answers with what went wrong when it
cannot (one validator, the same answer in every client, and the command is part of the chat's
history). ``/quit`` or end of input leaves. A dropped connection is resumed with ``since`` so no event
is lost or shown twice.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, TextIO
from urllib.parse import urlencode

import websockets
from rich.console import Console
from rich.text import Text

RECONNECT_ATTEMPTS = 10
CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400
QUIT = ("/quit", "/exit", "/q")
STYLES = {
    "session_created": "bold cyan", "user_message": "green", "marker_added": "yellow",
    "transition_fired": "blue", "transition_started": "blue", "transition_completed": "bold blue",
    "transition_failed": "bold red", "error": "bold red", "confirm_transition": "magenta",
    "confirm_request": "magenta",
}


class ChatError(Exception):
    """The chat cannot go on (unknown session, gateway gone): the message says why."""


def render(event: dict[str, Any]) -> str:
    """One event as one line (an agent's message may span several)."""
    kind = event.get("type", "?")
    value: Any = event.get("value")
    meta = event.get("metadata") or {}
    named = value.get("transition") if isinstance(value, dict) else None
    name = meta.get("transition_name") or named or "?"
    match kind:
        case "agent_message":
            return f"🤖 {value}"
        case "session_created":
            return f"[session_created] {value}"
        case "user_message":
            return f"[user_message] {value}"
        case "marker_added":
            return f"[marker_added] {value['location']} {_json(value['data'])}"
        case "transition_fired" | "transition_started":
            return f"[{kind}] {name}"
        case "transition_completed":
            outputs = ", ".join(f"{m['location']} {_json(m['data'])}" for m in value.get("outputs", []))
            return f"[transition_completed] {name}" + (f" → {outputs}" if outputs else "")
        case "transition_failed":
            retry = "" if value.get("final", True) else f" (attempt {value.get('attempt')}, will retry)"
            return f"[transition_failed] {name}: {value.get('error')}{retry}"
        case "confirm_transition":
            return f"[confirm_transition] {name}: {value.get('description') or 'waiting for confirmation'}"
        case "error":
            return f"[error] {value.get('code')}: {value.get('message')}"
        case _:
            return f"[{kind}] {_json(value)}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def stdin_lines(stream: TextIO | None = None) -> AsyncIterator[str]:
    """Lines of ``stream`` (stdin) as they arrive; works for a terminal, a pipe and a file alike.

    A daemon thread reads, so a pending read never holds up the shutdown of the process.
    """
    stream = stream or sys.stdin
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            for line in iter(stream.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (OSError, ValueError):
            pass  # stdin closed under us: same as end of input
        finally:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:
                pass  # the loop is gone: nobody is waiting for input anymore

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()

    async def lines() -> AsyncIterator[str]:
        while (line := await queue.get()) is not None:
            yield line

    return lines()


class Chat:
    """One chat session against a gateway at ``ws_base`` (``ws://host:port``)."""

    def __init__(self, ws_base: str, bot: str, *, session_id: str | None = None,
                 console: Console | None = None) -> None:
        self.ws_base = ws_base.rstrip("/")
        self.bot = bot
        self.session_id = session_id
        self.last_seq: int | None = None
        self.console = console or Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._closing = False
        self._last_error: str | None = None

    def url(self) -> str:
        params: dict[str, Any] = {}
        if self.session_id:
            params["session_id"] = self.session_id
            if self.last_seq is not None:
                params["since"] = self.last_seq
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.ws_base}/bots/{self.bot}/ws{query}"

    def show(self, line: str, style: str | None = None) -> None:
        self.console.print(Text(line, style=style or ""))
        self.console.file.flush()

    async def run(self, lines: AsyncIterator[str]) -> str | None:
        """Chat until ``/quit`` or the end of ``lines``; return the session id, once the log has shown it."""
        receiver = asyncio.create_task(self._receive(), name="chat-receive")
        sender = asyncio.create_task(self._send_lines(lines), name="chat-send")
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a ChatError from either side ends the chat with its message
        finally:
            self._closing = True
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            if self._ws is not None:
                await self._ws.close()
        return self.session_id if self.last_seq is not None else None

    async def _receive(self) -> None:
        attempt = 0
        while True:
            try:
                async with websockets.connect(self.url(), max_size=None, open_timeout=10) as ws:
                    self._ws = ws
                    self._connected.set()
                    async for raw in ws:
                        attempt = 0
                        try:
                            event = json.loads(raw)
                        except ValueError:
                            event = None
                        if not isinstance(event, dict):
                            self.show(f"[unreadable] {str(raw)[:200]}", "dim")
                            continue
                        self._on_event(event)
                    close = ws.close_code
                    reason = ws.close_reason
            except websockets.exceptions.ConnectionClosed as exc:
                close = exc.rcvd.code if exc.rcvd else None
                reason = (exc.rcvd.reason if exc.rcvd else "") or str(exc)
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                close, reason = None, str(exc) or type(exc).__name__
            finally:
                self._connected.clear()
                self._ws = None
            if self._closing:
                return
            if close in (CLOSE_NOT_FOUND, CLOSE_BAD_REQUEST):
                refused = f"the gateway refused the session (close code {close})"
                raise ChatError(self._last_error or reason or refused)
            attempt += 1
            if self.session_id is None or attempt > RECONNECT_ATTEMPTS:
                raise ChatError(f"lost the connection to {self.ws_base}: {reason or close}")
            self.show(f"[reconnecting] {reason or close}; attempt {attempt}", "dim")
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    def _on_event(self, event: dict[str, Any]) -> None:
        meta = event.get("metadata") or {}
        if meta.get("session_id"):
            self.session_id = meta["session_id"]
        if meta.get("seq") is not None:
            self.last_seq = meta["seq"]
        kind = event.get("type", "")
        if kind == "error" and isinstance(event.get("value"), dict):
            self._last_error = event["value"].get("message")
        try:
            line = render(event)
        except (AttributeError, KeyError, TypeError):
            line = f"[{kind}] {_json(event.get('value'))}"  # a shape this client does not know yet
        self.show(line, STYLES.get(kind))

    async def _send_lines(self, lines: AsyncIterator[str]) -> None:
        async for line in lines:
            text = line.strip()
            if not text:
                continue
            if text.lower() in QUIT:
                return
            await self._send({"type": "user_message", "value": text})

    async def _send(self, payload: dict[str, Any]) -> None:
        for _ in range(RECONNECT_ATTEMPTS * 2):
            await self._connected.wait()
            ws = self._ws
            if ws is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await ws.send(json.dumps(payload))
                return
            except websockets.exceptions.ConnectionClosed:
                await asyncio.sleep(0.1)  # the receiver reconnects; send again once it has
        raise ChatError("could not send your message: the gateway keeps closing the connection")
