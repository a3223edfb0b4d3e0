"""``BotContext``: what a running transition can do besides returning markers.

A transition runs in a sandbox (a warm worker process by default). Its context talks to the executor
that runs it over a :class:`Channel`; the executor turns each call into an event in the session's log,
so chat, memory, confirmations and files are all part of the one history that can be replayed.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel


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
        shown to the user.
        """
        return self._channel.call("prompt", {"text": str(text), "wait": wait_for_response}, timeout)

    def confirm(self, description: str, timeout: float | None = 300.0) -> bool:
        """Ask the user yes/no; ``False`` if they say no or do not answer within ``timeout`` seconds."""
        return bool(self._channel.call("confirm", {"description": str(description), "timeout": timeout}, timeout))

    def send_file(self, path: str, description: str | None = None) -> None:
        """Send the file at ``path`` to the user."""
        self._channel.call("send_file", {"path": str(path), "description": description}, None)

    def get_file(self, description: str, timeout: float | None = 300.0) -> str:
        """Ask the user for a file and return a local path to its bytes."""
        return str(self._channel.call("get_file", {"description": str(description), "timeout": timeout}, timeout))
