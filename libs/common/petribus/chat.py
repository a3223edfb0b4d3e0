"""A chat in the terminal, one line per event, like a Beam session: a thin face on ``petribus.client``.

Lines typed (or piped) in become ``user_message``s; ``/add LOCATION {json}`` is sent as a user message
too, so the LLM service turns it into a validated marker and answers with what went wrong when it
cannot (one validator, the same answer in every client, and the command is part of the chat's
history). ``/quit`` or end of input leaves.

People in the loop: a ``confirm_transition`` or ``confirm_request`` is asked as a yes/no question;
``y``/``n`` (or ``/yes``/``/no``, optionally with the task or request id) answers the oldest one still
open. What other clients of the session answer closes the question here too. A file a transition sends
(``output_file``) is saved under the download folder; one it asks for (``input_file_request``) is
answered with ``/upload PATH``.

When the bot hands the conversation over to another bot (a ``handed_off`` event, docs/handoffs.md), the
chat says so and, unless made with ``follow_handoffs=False``, follows: it goes on in the new session of
the other bot, showing its events from the start, and sends what is typed next there.

The connection is the client's ``EventStream``: a dropped connection is resumed with ``since`` so no
event is lost or shown twice, and a message the log did not take (``bus_unavailable``, or a drop before
it showed) is sent again with the same ``request_id``. The chat shows what the stream does
(``[reconnecting]``, ``[resending]``, ``[not sent]``) and keeps what the user must answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from petribus.client import Client, ClientError, Event, Session
from petribus.client._stream import NoticeKind

QUIT = ("/quit", "/exit", "/q")
CHAT_HELP = ("In this chat: y / n (or /yes, /no [TASK or REQUEST id]) answers the oldest open question; "
             "/upload PATH sends the file a transition asked for; /quit (or Ctrl-D) leaves. The bot's own "
             "commands follow.")
YES = ("y", "yes", "/y", "/yes", "/accept")
NO = ("n", "no", "/n", "/no", "/reject")
STYLES = {
    "session_created": "bold cyan", "user_message": "green", "marker_added": "yellow",
    "transition_fired": "blue", "transition_started": "blue", "transition_completed": "bold blue",
    "transition_failed": "bold red", "error": "bold red", "confirm_transition": "magenta",
    "confirm_request": "magenta", "handed_off": "bold cyan",
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
            parent = meta.get("parent")
            came = f" (handed over by {parent['bot']}, session {parent['session_id']})" if parent else ""
            return f"[session_created] {value}{came}"
        case "handed_off":
            return (f"[handed_off] the conversation was handed over to {value['bot']} (session "
                    f"{value['session_id']}): {value['request']}")
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
            kind_of = value.get("error_type")
            line = f"[transition_failed] {name}: " + (f"{kind_of}: " if kind_of else "") + f"{value.get('error')}{retry}"
            where = _last_frame(value.get("traceback"))
            consumed = ", ".join(f"{m['location']} {_json(m['data'])}" for m in value.get("inputs", []))
            return line + (f"\n    at {where}" if where else "") + (f"\n    inputs: {consumed}" if consumed else "")
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


def _last_frame(traceback: str | None) -> str | None:
    """``file:line in function: code`` of a traceback's innermost frame (where it raised)."""
    lines = (traceback or "").splitlines()
    at = max((i for i, text in enumerate(lines) if text.startswith("  File ")), default=None)
    if at is None:
        return None
    head = lines[at].strip()  # File "/path/app.py", line 41, in parse_amount
    try:
        path, rest = head[len('File "'):].split('", line ', 1)
        number, function = rest.split(", in ", 1)
    except ValueError:
        return head
    code = lines[at + 1].strip() if at + 1 < len(lines) and lines[at + 1].startswith("    ") else ""
    return f"{Path(path).name}:{number} in {function}" + (f": {code}" if code else "")


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
    """One chat session against a gateway at ``ws_base`` (``ws://host:port``), shown on ``console``."""

    def __init__(self, ws_base: str, bot: str, *, session_id: str | None = None,
                 console: Console | None = None, download_dir: Path | None = None,
                 follow_handoffs: bool = True) -> None:
        self.ws_base = ws_base.rstrip("/")
        self.bot = bot
        self.follow_handoffs = follow_handoffs
        self.download_dir = download_dir or Path.cwd() / "petribus-downloads"
        self.console = console or Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
        # Open questions (task or request id -> "transition" or "confirm") and file requests, oldest first.
        self.questions: OrderedDict[str, str] = OrderedDict()
        self.file_requests: OrderedDict[str, str] = OrderedDict()
        self._asked_by: dict[str, str | None] = {}  # question or file request id -> the firing that asked
        self._max_bytes: dict[str, int | None] = {}
        self._downloads: set[asyncio.Task[None]] = set()
        self.client = Client(self.ws_base)
        self.stream = self.client.stream(bot, session_id, on_notice=self._notice)

    @property
    def session_id(self) -> str | None:
        return self.stream.session_id

    @property
    def last_seq(self) -> int | None:
        return self.stream.last_seq

    @property
    def unconfirmed(self) -> OrderedDict[str, tuple[dict[str, Any], int]]:
        """Messages sent and not yet seen in the log (the stream sends them again)."""
        return self.stream.unconfirmed

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The error events the gateway sent this chat, as they came."""
        return [event.raw for event in self.stream.errors]

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
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            if self._downloads:  # downloads already under way finish: the file was announced
                await asyncio.gather(*self._downloads, return_exceptions=True)
            await self.stream.close()
            await self.client.aclose()
        return self.session_id if self.last_seq is not None else None

    async def _receive(self) -> None:
        try:
            while True:
                handed: Event | None = None
                async for event in self.stream:
                    self._on_event(event)
                    if event.handoff is not None and self.follow_handoffs:
                        handed = event
                        break
                if handed is None:
                    return
                await self._follow(handed)
        except ClientError as exc:
            raise ChatError(str(exc)) from None

    async def _follow(self, handed: Event) -> None:
        """Go on in the session the conversation was handed over to: its events from the start, and
        what is typed next goes there. Questions still open here stay with the session they belong to."""
        target = await self._session().follow_handoff(handed)
        old = self.stream
        self.bot = target.bot
        self.stream = self.client.stream(target.bot, target.session_id, on_notice=self._notice)
        self.questions.clear()
        self.file_requests.clear()
        self._asked_by.clear()
        await old.close()
        self.show(f"[following] {target.bot} session {target.session_id}", "bold cyan")

    def _notice(self, kind: NoticeKind, text: str) -> None:
        if kind == "not_sent":
            self.show(f"[not sent] {text}", "bold red")
        else:
            self.show(f"[{kind}] {text}", "dim")  # reconnecting, resending, unreadable

    def _on_event(self, event: Event) -> None:
        try:
            line = render(event.raw)
        except (AttributeError, KeyError, TypeError):
            line = f"[{event.type}] {_json(event.value)}"  # a shape this client does not know yet
        self.show(line, STYLES.get(event.type))
        self._track(event)

    def _track(self, event: Event) -> None:
        """Keep the open questions and file requests as the log shows them (any client may answer)."""
        task, request, value = event.task_id, event.request_id, event.value
        match event.type:
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
                    event.type == "transition_completed" or event.final):
                # The firing ended: what it asked can no longer be answered.
                self.questions.pop(task, None)
                for ident in [i for i, f in self._asked_by.items() if f == task]:
                    self.questions.pop(ident, None)
                    self.file_requests.pop(ident, None)
                    del self._asked_by[ident]
            case "output_file" if isinstance(value, dict) and value.get("url"):
                download = asyncio.create_task(self._download(value), name="chat-download")
                self._downloads.add(download)
                download.add_done_callback(self._downloads.discard)

    def _session(self) -> Session:
        return self.client.session(self.bot, self.session_id)

    async def _download(self, value: dict[str, Any]) -> None:
        name = Path(str(value.get("name") or value["file_id"])).name or str(value["file_id"])
        target = self.download_dir / f"{value['file_id'][:8]}-{name}"
        try:
            self.download_dir.mkdir(parents=True, exist_ok=True)
            await self._session().download(value["url"], target)
        except (OSError, ClientError) as exc:
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
            await self._session().upload(file_id, path)
        except (OSError, ClientError) as exc:
            self.show(f"[upload failed] {path}: {exc}", "bold red")

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
                if word.lower() in ("/help", "/?"):  # the bot describes itself; this chat adds its own commands
                    self.show(CHAT_HELP, "dim")
                await self._send({"type": "user_message", "value": text})

    async def _send(self, payload: dict[str, Any]) -> None:
        try:
            await self.stream.send(payload)
        except ClientError as exc:
            raise ChatError(f"could not send your message: {exc}") from None
