"""``BotContext``: what a running transition can do besides returning markers.

A transition runs in a sandbox (a warm worker process by default). Its context talks to the executor
that runs it over a :class:`Channel`; the executor turns each call into an event in the session's log,
so chat, memory, confirmations and files are all part of the one history that can be replayed.
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
        """Ask the executor and block until it answers (prompt, confirm, files)."""


class BotContext:
    """Handed to a transition that asks for a ``context`` parameter."""

    def __init__(self, channel: Channel, *, bot: str, session_id: str, firing_id: str, transition: str) -> None:
        self._channel = channel
        self.bot = bot
        self.session_id = session_id
        self.firing_id = firing_id
        self.transition = transition

    def __repr__(self) -> str:
        return f"BotContext(session_id={self.session_id!r}, transition={self.transition!r})"

    def say(self, text: str) -> None:
        """Show ``text`` to the user now, as an ``agent_message`` from this transition."""
        self._channel.send("say", str(text))

    def remember(self, obj: Any) -> None:
        """Add ``obj`` (JSON-able or a pydantic model) to the session's memory (``memory_updated``)."""
        if isinstance(obj, BaseModel):
            obj = obj.model_dump(mode="json")
        self._channel.send("remember", obj)

    def prompt(self, text: str, wait_for_response: bool = True, timeout: float | None = 60.0) -> str | None:
        """Ask the session's model ``text`` with the session's context.

        Blocking (the default) returns the reply; otherwise it returns ``None`` at once and the reply is
        shown to the user. The question is a ``prompt_request`` event and the reply a ``prompt_response``
        (answered by the LLM service). Raises a ``PetribusError`` (code ``prompt_timeout``) when no reply
        comes within ``timeout`` seconds, or with the model's error (e.g. ``llm_auth``).
        """
        timeout = _timeout("prompt", timeout)
        payload = {"text": str(text), "wait": bool(wait_for_response), "timeout": timeout}
        return self._channel.call("prompt", payload, _call_timeout(timeout))

    def confirm(self, description: str, timeout: float | None = 300.0) -> bool:
        """Ask the user yes/no; ``False`` if they say no or do not answer within ``timeout`` seconds.

        The question is a ``confirm_request`` event; the first ``confirm_response`` to it decides.
        ``timeout=None`` waits as long as the transition may run.
        """
        timeout = _timeout("confirm", timeout)
        payload = {"description": str(description), "timeout": timeout}
        return bool(self._channel.call("confirm", payload, _call_timeout(timeout)))

    def send_file(self, path: str | os.PathLike[str], description: str | None = None) -> None:
        """Send the file at ``path`` to the user (an ``output_file`` event with a download URL).

        Raises ``FileTooLarge`` when it is over ``PETRIBUS_MAX_FILE_BYTES``.
        """
        payload = {"path": os.path.abspath(os.fspath(path)),
                   "description": None if description is None else str(description)}
        self._channel.call("send_file", payload, None)

    def get_file(self, description: str, timeout: float | None = 300.0) -> str:
        """Ask the user for a file and return a local path to its bytes.

        The request is an ``input_file_request`` event with an upload URL. The path is in a folder of
        this firing that is removed when the transition returns: copy the file to keep it. Raises a
        ``PetribusError`` (code ``file_timeout``) when nothing is uploaded within ``timeout`` seconds.
        """
        timeout = _timeout("get_file", timeout)
        payload = {"description": str(description), "timeout": timeout}
        return str(self._channel.call("get_file", payload, _call_timeout(timeout)))


def _timeout(call: str, timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0):
        raise InvalidInput(f"context.{call}(timeout={timeout!r}): give a positive number of seconds or None")
    return float(timeout)


def _call_timeout(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + CALL_GRACE_S
