"""A chat in the terminal: a WebSocket client of the gateway, one line per event, like a Beam session.

Lines typed (or piped) in become ``user_message``s; ``/add LOCATION {json}`` is sent as a user message
too, so the LLM service turns it into a validated marker and answers with what went wrong when it
cannot (one validator, the same answer in every client, and the command is part of the chat's
history). ``/quit`` or end of input leaves. A dropped connection is resumed with ``since`` so no event
is lost or shown twice.

People in the loop: a ``confirm_transition`` or ``confirm_request`` is asked as a yes/no question;
``y``/``n`` (or ``/yes``/``/no``, optionally with the task or request id) answers the oldest one still
open. What other clients of the session answer closes the question here too. A file a transition sends
(``output_file``) is saved under the download folder; one it asks for (``input_file_request``) is
answered with ``/upload PATH``.

Every message goes out with a ``request_id`` of its own and is kept until the log shows it (an event
that carries that ``request_id``). When the gateway answers ``bus_unavailable`` (NATS restarting or
failing over), or the connection drops and comes back, the chat sends it again with the same
``request_id`` (``RESEND_ATTEMPTS`` times at most): the gateway records it exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import httpx
import websockets
from rich.console import Console
from rich.text import Text

RECONNECT_ATTEMPTS = 10
RESEND_ATTEMPTS = 5  # sends of one message after the first, while the bus is unavailable
RESEND_BACKOFF_S = 0.5  # times the attempt: the gateway asks for about 2 s
BUS_UNAVAILABLE = "bus_unavailable"
CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400
QUIT = ("/quit", "/exit", "/q")
YES = ("y", "yes", "/y", "/yes", "/accept")
NO = ("n", "no", "/n", "/no", "/reject")
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
            markers = ", ".join(f"{m['location']} {_json(m['data'])}" for m in value.get("markers", []))
            return (f"[confirm_transition] {name}: {value.get('description') or 'waiting for confirmation'}"
                    + (f" (would consume {markers})" if markers else "") + " — run it? y/n")
        case "accept_transition":
            return f"[accept_transition] {meta.get('task_id')}"
        case "reject_transition":
            return f"[reject_transition] {meta.get('task_id')}: {value.get('reason', 'rejected')}"
        case "confirm_request":
            return f"[confirm_request] {value} — y/n"
        case "confirm_response":
            return f"[confirm_response] {'yes' if value else 'no'}"
        case "input_file_request":
            return f"[input_file_request] {value.get('description')} — send one with /upload PATH"
        case "input_file_response":
            return f"[input_file_response] {value.get('name')} ({value.get('size')} bytes)"
        case "output_file":
            return f"[output_file] {value.get('name')} ({value.get('size')} bytes): {value.get('description') or ''}"
        case "error":
            return f"[error] {value.get('code')}: {value.get('message')}"
        case _:
            return f"[{kind}] {_json(value)}"


async def _chunks(fh: Any, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


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
                 console: Console | None = None, download_dir: Path | None = None) -> None:
        self.ws_base = ws_base.rstrip("/")
        self.http_base = self.ws_base.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.download_dir = download_dir or Path.cwd() / "petribus-downloads"
        # Open questions (task or request id -> the answer's message type) and file requests, oldest first.
        self.questions: OrderedDict[str, str] = OrderedDict()
        self.file_requests: OrderedDict[str, str] = OrderedDict()
        self._asked_by: dict[str, str | None] = {}  # question or file request id -> the firing that asked
        self._max_bytes: dict[str, int | None] = {}
        self._http: httpx.AsyncClient | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.bot = bot
        self.session_id = session_id
        self.last_seq: int | None = None
        self.console = console or Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._closing = False
        self._last_error: str | None = None
        # Messages sent and not yet seen in the log: request_id -> (message, sends after the first).
        self.unconfirmed: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.errors: list[dict[str, Any]] = []  # error events the gateway sent this client

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
            if self._background:  # downloads already under way finish: the file was announced
                await asyncio.gather(*self._background, return_exceptions=True)
            if self._ws is not None:
                await self._ws.close()
            if self._http is not None:
                await self._http.aclose()
        return self.session_id if self.last_seq is not None else None

    async def _receive(self) -> None:
        attempt = 0
        while True:
            try:
                async with websockets.connect(self.url(), max_size=None, open_timeout=10) as ws:
                    self._ws = ws
                    self._connected.set()
                    if attempt:  # back after a drop: what was sent may not have been recorded
                        for request_id in list(self.unconfirmed):
                            self._resend_later(request_id, "the connection dropped")
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
        if event.get("type") == "agent_message_delta":
            return  # a line per streamed piece would be noise: the whole agent_message follows
        meta = event.get("metadata") or {}
        if meta.get("session_id"):
            self.session_id = meta["session_id"]
        if meta.get("seq") is not None:
            self.last_seq = meta["seq"]
        kind = event.get("type", "")
        request_id = meta.get("request_id")
        if kind == "error" and isinstance(event.get("value"), dict):
            self._last_error = event["value"].get("message")
            self.errors.append(event)
            if self._on_error(event["value"].get("code"), request_id):
                return
        elif request_id in self.unconfirmed and meta.get("seq") is not None:
            del self.unconfirmed[request_id]  # in the log: sent for good
        try:
            line = render(event)
        except (AttributeError, KeyError, TypeError):
            line = f"[{kind}] {_json(event.get('value'))}"  # a shape this client does not know yet
        self.show(line, STYLES.get(kind))
        self._track(kind, event.get("value"), meta)

    def _on_error(self, code: str | None, request_id: str | None) -> bool:
        """Act on an error about a message this chat sent; True when it needs no line of its own."""
        if request_id not in self.unconfirmed:
            return False
        resends = self.unconfirmed[request_id][1]
        if code == BUS_UNAVAILABLE:
            return self._resend_later(request_id, "the gateway could not record it")
        del self.unconfirmed[request_id]
        # A resent answer that was recorded the first time: nothing went wrong.
        return code == "already_answered" and resends > 0

    def _resend_later(self, request_id: str, why: str) -> bool:
        payload, resends = self.unconfirmed[request_id]
        if resends >= RESEND_ATTEMPTS:
            del self.unconfirmed[request_id]
            self.show(f"[not sent] {why} after {resends + 1} tries; send it again: {_json(payload)}",
                      "bold red")
            return True
        self.unconfirmed[request_id] = (payload, resends + 1)
        self.show(f"[resending] {why}; sending it again (try {resends + 2})", "dim")
        task = asyncio.create_task(self._resend(request_id, payload, resends + 1), name="chat-resend")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _resend(self, request_id: str, payload: dict[str, Any], resends: int) -> None:
        await asyncio.sleep(RESEND_BACKOFF_S * resends)
        if request_id in self.unconfirmed and not self._closing:
            await self._transmit(payload)

    def _track(self, kind: str, value: Any, meta: dict[str, Any]) -> None:
        """Keep the open questions and file requests as the log shows them (any client may answer)."""
        task, request = meta.get("task_id"), meta.get("request_id")
        match kind:
            case "confirm_transition" if task:
                self.questions[task] = "transition"
            case "accept_transition" | "reject_transition" if task:
                self.questions.pop(task, None)
            case "confirm_request" if request:
                self.questions[request] = "confirm"
                self._asked_by[request] = task
            case "confirm_response" if request:
                self.questions.pop(request, None)
            case "input_file_request" if isinstance(value, dict) and value.get("file_id"):
                self.file_requests[value["file_id"]] = value.get("upload_url") or ""
                self._asked_by[value["file_id"]] = task
                self._max_bytes[value["file_id"]] = value.get("max_bytes")
            case "input_file_response" if isinstance(value, dict):
                self.file_requests.pop(value.get("file_id", ""), None)
            case "transition_completed" | "transition_failed" if task and (
                    kind == "transition_completed" or (isinstance(value, dict) and value.get("final", True))):
                # The firing ended: what it asked can no longer be answered.
                self.questions.pop(task, None)
                for ident in [i for i, f in self._asked_by.items() if f == task]:
                    self.questions.pop(ident, None)
                    self.file_requests.pop(ident, None)
                    del self._asked_by[ident]
            case "output_file" if isinstance(value, dict) and value.get("url"):
                task_ = asyncio.create_task(self._download(value), name="chat-download")
                self._background.add(task_)
                task_.add_done_callback(self._background.discard)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.http_base, timeout=60)
        return self._http

    async def _download(self, value: dict[str, Any]) -> None:
        name = Path(str(value.get("name") or value["file_id"])).name or str(value["file_id"])
        target = self.download_dir / f"{value['file_id'][:8]}-{name}"
        try:
            self.download_dir.mkdir(parents=True, exist_ok=True)
            async with self._client().stream("GET", value["url"]) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")[:300]
                    self.show(f"[download failed] {name}: HTTP {resp.status_code} {body}", "bold red")
                    return
                with open(target, "wb") as out:
                    async for chunk in resp.aiter_bytes():
                        out.write(chunk)
        except (OSError, httpx.HTTPError) as exc:
            self.show(f"[download failed] {name}: {exc}", "bold red")
            return
        self.show(f"[saved] {target}", "green")

    async def _answer(self, yes: bool, ident: str | None) -> None:
        if ident is None:
            if not self.questions:
                self.show("[nothing to answer] no confirmation is waiting", "dim")
                return
            ident = next(iter(self.questions))
        kind = self.questions.get(ident)
        if kind == "confirm":  # its request_id is the question's: one answer per question anyway
            await self._send({"type": "confirm_response", "value": {"request_id": ident, "accepted": yes},
                              "request_id": ident})
        else:  # a task id, or an id this client has not seen asked: the gateway says if it is unknown
            await self._send({"type": "accept_transition" if yes else "reject_transition", "value": ident})

    async def _upload(self, path_text: str) -> None:
        parts = path_text.rsplit(" ", 1)
        file_id = None
        if len(parts) == 2 and parts[1] in self.file_requests:
            path_text, file_id = parts
        if not self.file_requests and file_id is None:
            self.show("[nothing to upload] no file has been asked for", "dim")
            return
        file_id = file_id or next(iter(self.file_requests))
        url = self.file_requests[file_id]
        path = Path(path_text.strip().strip("'\"")).expanduser()
        if not path.is_file():
            self.show(f"[upload failed] {path} is not a file", "bold red")
            return
        limit = self._max_bytes.get(file_id)
        size = path.stat().st_size
        if limit is not None and size > limit:
            self.show(f"[upload refused] {path} is {size} bytes; the bot accepts at most {limit}", "bold red")
            return
        try:
            with open(path, "rb") as fh:  # streamed: a large file is never held in memory whole
                resp = await self._client().put(f"{url}?name={quote(path.name)}", content=_chunks(fh),
                                                headers={"content-length": str(size)})
        except (OSError, httpx.HTTPError) as exc:
            self.show(f"[upload failed] {path}: {exc}", "bold red")
            return
        if resp.status_code >= 300:
            try:
                detail = resp.json().get("message", resp.text)
            except ValueError:
                detail = resp.text
            self.show(f"[upload failed] {path}: HTTP {resp.status_code} {detail}", "bold red")

    async def _send_lines(self, lines: AsyncIterator[str]) -> None:
        async for line in lines:
            text = line.strip()
            if not text:
                continue
            if text.lower() in QUIT:
                return
            word, _, rest = text.partition(" ")
            if word.lower() in YES + NO and (self.questions or word.startswith("/")):
                await self._answer(word.lower() in YES, rest.strip() or None)
            elif word.lower() == "/upload":
                await self._upload(rest.strip())
            else:
                await self._send({"type": "user_message", "value": text})

    async def _send(self, payload: dict[str, Any]) -> None:
        """Send a message with a ``request_id`` (a new one unless it has its own), kept until it lands."""
        payload = {**payload, "request_id": payload.get("request_id") or uuid.uuid4().hex}
        self.unconfirmed[payload["request_id"]] = (payload, 0)
        await self._transmit(payload)

    async def _transmit(self, payload: dict[str, Any]) -> None:
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
