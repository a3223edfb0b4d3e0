"""``BotContext``: what a running transition can do besides returning markers.

A transition runs in a sandbox (a warm worker process by default). Its context talks to the executor
that runs it over a :class:`Channel`; the executor turns each call into an event in the session's log,
so chat, memory, confirmations and files are all part of the one history that can be replayed.

The questions (``prompt``, ``confirm``, ``get_file``, ``send_file``) come twice. The plain methods
block the calling thread until the answer comes, as Beam's do: right for a ``def`` transition (and any
thread it starts). An ``async def`` transition shares its worker's event loop with the other async
firings in that process, so it should ``await`` the ``a``-twins (``aprompt``, ``aconfirm``,
``asend_file``, ``aget_file``): same arguments, same answers, same errors, and the loop runs on while
they wait. ``say`` and ``remember`` never wait and work the same from both.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

from pydantic import BaseModel

from petribus.errors import InvalidInput

# The executor answers a confirm or get_file call itself when the user's time is up; the worker's own
# wait only guards against an executor that never answers, so it allows this much longer.
CALL_GRACE_S = 60.0

class Channel(Protocol):
    """The seam between a transition and its executor."""

    def send(self, kind: str, payload: Any) -> None:
        """Fire-and-forget: the executor appends an event (say, remember)."""

    def call(self, kind: str, payload: Any, timeout: float | None) -> Any:
        """Ask the executor and block the calling thread until it answers (prompt, confirm, files)."""

    async def acall(self, kind: str, payload: Any, timeout: float | None) -> Any:
        """``call`` for a coroutine: waits without blocking its event loop."""


class BotContext:
    """Handed to a transition that asks for a ``context`` parameter."""

    def __init__(self, channel: Channel, *, bot: str, session_id: str, firing_id: str, transition: str) -> None:
        self._channel = channel
        self.bot = bot
        self.session_id = session_id
        self.firing_id = firing_id
        self.transition = transition

    @property
    def workdir(self) -> str | None:
        """This run's own folder, emptied or removed when it ends. A ``def`` transition runs in it (its
        working directory); an ``async def`` one shares its process's working directory, so it should
        write here explicitly (the folder is made when first asked for). Files it sends must be here."""
        return getattr(self._channel, "folder", None)

    def __repr__(self) -> str:
        return f"BotContext(session_id={self.session_id!r}, transition={self.transition!r})"

    @property
    def idempotency_key(self) -> str:
        """The same string in every run of this firing (re-runs after a crash, retries): send it with calls
        to outside services (an ``Idempotency-Key`` header, a request id) so they can drop a repeat.

        What the firing appends to the log (``say``, ``remember``, questions, files) lands once however
        often it runs; a call to the outside world made before the executor died is made again.
        """
        return self.firing_id

    def say(self, text: str) -> None:
        """Show ``text`` to the user now, as an ``agent_message`` from this transition. Never waits."""
        self._channel.send("say", str(text))

    def remember(self, obj: Any) -> None:
        """Add ``obj`` (JSON-able or a pydantic model) to the session's memory (``memory_updated``).

        Never waits: like ``say``, it is sent and the transition goes on.
        """
        if isinstance(obj, BaseModel):
            obj = obj.model_dump(mode="json")
        self._channel.send("remember", obj)

    def prompt(self, text: str, wait_for_response: bool = True, timeout: float | None = 60.0) -> str | None:
        """Ask the session's model ``text`` with the session's context.

        Blocking (the default) returns the reply; otherwise it returns ``None`` at once and the reply is
        shown to the user. The question is a ``prompt_request`` event and the reply a ``prompt_response``
        (answered by the LLM service). Raises a ``PetribusError`` (code ``prompt_timeout``) when no reply
        comes within ``timeout`` seconds, or with the model's error (e.g. ``llm_auth``).

        It blocks the calling thread. In an ``async def`` transition that is the worker's event loop,
        and every other async firing in the same worker process stalls with it until the answer comes:
        ``await context.aprompt(...)`` there instead.
        """
        return self._channel.call("prompt", *_prompt(text, wait_for_response, timeout))

    async def aprompt(self, text: str, wait_for_response: bool = True,
                      timeout: float | None = 60.0) -> str | None:
        """``prompt`` for an ``async def`` transition: awaits the reply without blocking the event loop."""
        return await self._channel.acall("prompt", *_prompt(text, wait_for_response, timeout))

    def confirm(self, description: str, timeout: float | None = 300.0) -> bool:
        """Ask the user yes/no; ``False`` if they say no or do not answer within ``timeout`` seconds.

        The question is a ``confirm_request`` event; the first ``confirm_response`` to it decides.
        ``timeout=None`` waits as long as the transition may run.

        It blocks the calling thread. In an ``async def`` transition that is the worker's event loop,
        and every other async firing in the same worker process stalls with it until the answer comes:
        ``await context.aconfirm(...)`` there instead.
        """
        return bool(self._channel.call("confirm", *_confirm(description, timeout)))

    async def aconfirm(self, description: str, timeout: float | None = 300.0) -> bool:
        """``confirm`` for an ``async def`` transition: awaits the answer without blocking the event loop."""
        return bool(await self._channel.acall("confirm", *_confirm(description, timeout)))

    def send_file(self, path: str | os.PathLike[str], description: str | None = None) -> None:
        """Send the file at ``path`` to the user (an ``output_file`` event with a download URL).

        Only files inside this run's folder (``context.workdir``; a relative ``path`` is relative to it)
        or the bot's volumes may be sent, after symlinks are resolved; any other path is refused
        (``PetribusError``, code ``file_not_allowed``). Returns once the file is stored. Raises
        ``FileTooLarge`` when it is over ``PETRIBUS_MAX_FILE_BYTES``.

        It blocks the calling thread. In an ``async def`` transition that is the worker's event loop,
        and every other async firing in the same worker process stalls with it until the answer comes:
        ``await context.asend_file(...)`` there instead.
        """
        self._channel.call("send_file", _send_file(path, description), None)

    async def asend_file(self, path: str | os.PathLike[str], description: str | None = None) -> None:
        """``send_file`` for an ``async def`` transition: awaits the upload without blocking the event loop."""
        await self._channel.acall("send_file", _send_file(path, description), None)

    def get_file(self, description: str, timeout: float | None = 300.0) -> str:
        """Ask the user for a file and return a local path to its bytes.

        The request is an ``input_file_request`` event with an upload URL. The path is in a folder of
        this firing that is removed when the transition returns: copy the file to keep it. Raises a
        ``PetribusError`` (code ``file_timeout``) when nothing is uploaded within ``timeout`` seconds.

        It blocks the calling thread. In an ``async def`` transition that is the worker's event loop,
        and every other async firing in the same worker process stalls with it until the answer comes:
        ``await context.aget_file(...)`` there instead.
        """
        return str(self._channel.call("get_file", *_get_file(description, timeout)))

    async def aget_file(self, description: str, timeout: float | None = 300.0) -> str:
        """``get_file`` for an ``async def`` transition: awaits the upload without blocking the event loop."""
        return str(await self._channel.acall("get_file", *_get_file(description, timeout)))


# Each call's arguments, checked and shaped once for both the blocking and the awaitable form.

def _prompt(text: str, wait_for_response: bool, timeout: float | None) -> tuple[dict[str, Any], float | None]:
    timeout = _timeout("prompt", timeout)
    return {"text": str(text), "wait": bool(wait_for_response), "timeout": timeout}, _call_timeout(timeout)


def _confirm(description: str, timeout: float | None) -> tuple[dict[str, Any], float | None]:
    timeout = _timeout("confirm", timeout)
    return {"description": str(description), "timeout": timeout}, _call_timeout(timeout)


def _send_file(path: str | os.PathLike[str], description: str | None) -> dict[str, Any]:
    return {"path": os.fspath(path),
            "description": None if description is None else str(description)}


def _get_file(description: str, timeout: float | None) -> tuple[dict[str, Any], float | None]:
    timeout = _timeout("get_file", timeout)
    return {"description": str(description), "timeout": timeout}, _call_timeout(timeout)


def _timeout(call: str, timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0):
        raise InvalidInput(f"context.{call}(timeout={timeout!r}): give a positive number of seconds or None")
    return float(timeout)


def _call_timeout(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + CALL_GRACE_S
